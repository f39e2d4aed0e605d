"""A synthetic evaluated run (metrics.json, eval/examples.npz, metrics.jsonl) for report tests.

The files follow the format `agcg evaluate` and training write (examples as
`agcg_jax.examples.ExampleMaps`); the images are tiny drawn chest phantoms
with their counterfactual twins, so the figures look like the real thing.
"""
import json
import os

import numpy as np

from agcg_jax.examples import DIRECTIONS, ExampleMaps

CLASS_NAMES = ["No Finding", "Cardiomegaly"]
# Chosen so the formatted numbers are unambiguous: 16/20 and 6/20.
CONFUSION_ORIGINAL = [[9, 1], [3, 7]]
CONFUSION_TRANSLATED = [[2, 8], [4, 6]]
ACCURACY_ORIGINAL_TEXT = "80.0%"
ACCURACY_TRANSLATED_TEXT = "30.0%"
# Source class (label) of each direction, and the heart half-widths of source and twin.
SOURCE_LABEL = {"to_cardiomegaly": 0, "to_no_finding": 1}
HEART_WIDTH = {0: 0.25, 1: 0.42}


def _chest(size: int, heart_halfwidth: float, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A phantom [S, S] in [-1, 1] and its heart mask [S, S] in {0, 1}; noise [S, S] is added."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1  # [-1, 1]
  body = (x / 0.9) ** 2 + (y / 0.95) ** 2 < 1
  lungs = (((x + 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1) | (
      ((x - 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1)
  heart = ((x - 0.05) / heart_halfwidth) ** 2 + ((y - 0.3) / 0.3) ** 2 < 1
  image = np.full((size, size), -1.0)
  image[body] = 0.3
  image[lungs] = -0.6
  image[heart] = 0.5
  image += noise
  return np.clip(image, -1, 1).astype(np.float32), heart.astype(np.float32)


def _border_band(mask: np.ndarray, width: int = 2) -> np.ndarray:
  """[S, S] -> [S, S] soft band in [0, 1] around the mask's border."""
  grown, shrunk = mask.astype(bool), mask.astype(bool)
  for _ in range(width):
    grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(
        grown, -1, 1)
    shrunk = shrunk & np.roll(shrunk, 1, 0) & np.roll(shrunk, -1, 0) & np.roll(
        shrunk, 1, 1) & np.roll(shrunk, -1, 1)
  return (grown & ~shrunk).astype(np.float32)


def metrics(dataset: str = "phantoms", size: int = 32) -> dict:
  """A metrics.json object as `agcg evaluate` writes it (distinct values, for tests to find)."""
  m = {
      "dataset": dataset,
      "image_size": size,
      "date": "2026-11-27T13:00:00",
      "device": "cpu (2 devices)",
      "num_test": 20,
      "class_names": CLASS_NAMES,
      "accuracy_original": 0.8,
      "accuracy_translated": 0.3,
      "accuracy_chance": 0.55,
      "confusion_original": CONFUSION_ORIGINAL,
      "confusion_translated": CONFUSION_TRANSLATED,
      "flip_rate": 0.6,
      "flip_rate_by_class": {"No Finding": 0.7, "Cardiomegaly": 0.5},
      "cam_kind": "margin",
      "cam_attention_pearson": 0.412,
      "classifier_step": 400,
      "gan_step": 2000,
      "config": {"data": {"image_size": size, "source": dataset},
                 "gan": {"steps": 10, "lr_d": 4e-4},
                 "note": "<script>alert('x')</script>"},
  }
  if dataset == "phantoms":
    m.update(
        flip_rate_twin=0.9,
        truth_support_share=0.081,
        attention_truth_enrichment=3.21, cam_truth_enrichment=1.87,
        diff_truth_enrichment=4.05, prior_truth_enrichment=2.46,
        attention_truth_pearson=0.512, cam_truth_pearson=0.153,
        diff_truth_pearson=0.734, prior_truth_pearson=0.387,
        attention_truth_topk_iou=0.311, cam_truth_topk_iou=0.127,
        diff_truth_topk_iou=0.456, prior_truth_topk_iou=0.268,
        truth_topk_iou_chance=0.0421,
        counterfactual_error=0.62,
        change_inside_truth=21.5, change_outside_truth=3.25,
        ctr_direction_correct=0.85, ctr_direction_correct_model_free=0.775,
        ctr_shift={"to_cardiomegaly": 0.061, "to_no_finding": -0.048},
        ctr_shift_model_free={"to_cardiomegaly": 0.052, "to_no_finding": -0.039},
        ctr_crosses_threshold=0.45, ctr_regressor_mae=0.0123, ruler_mae=0.0215,
        ctr_mae_fixed_prior=0.0634, truth_enrichment_chance=1.0,
        counterfactual_error_identity=1.0,
        ruler_twin_order=0.95, direction_chance=0.5)
  else:
    m.update(num_boxed=8, box_area_share=0.183, box_enrichment_chance=1.0,
             attention_box_enrichment=1.42, cam_box_enrichment=1.17,
             diff_box_enrichment=1.33, prior_box_enrichment=1.29,
             attention_pointing=0.75, cam_pointing=0.5, diff_pointing=0.875,
             fixed_point_pointing=0.625)
  return m


def _smooth(a: np.ndarray, times: int = 3) -> np.ndarray:
  for _ in range(times):
    a = (a + np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1)) / 5
  return a


def examples(size: int = 32, n: int = 2, dataset: str = "phantoms",
             empty_cells: tuple[tuple[int, int], ...] = ((1, 0),), seed: int = 0,
             cam_kind: str = "margin") -> ExampleMaps:
  """n cases per direction; the (label, pred) CAM cells in `empty_cells` get no case.

  Phantoms carry `heart_mask` and `twin` (the same phantom with the other
  label: same noise, other heart), CTRs; NIH none of these (CTRs NaN).
  `cam` is signed like a margin map: positive around the heart border,
  negative elsewhere, with a different scale per case.
  """
  rng = np.random.default_rng(seed)
  parts = []
  for direction in DIRECTIONS:
    label = SOURCE_LABEL[direction]
    preds = [p for p in (label, 1 - label) if (label, p) not in empty_cells]
    if not preds:
      raise ValueError(f"every CAM cell of label {label} is empty")
    rows = {k: [] for k in ("real", "attention", "generated", "fake", "cam", "heart_mask",
                            "twin", "ctr_real", "ctr_fake")}
    for i in range(n):
      noise = 0.05 * rng.standard_normal((size, size))
      real, heart = _chest(size, HEART_WIDTH[label], noise)
      twin, twin_heart = _chest(size, HEART_WIDTH[1 - label], noise)
      attention = np.clip(_border_band(heart) + _border_band(twin_heart), 0, 1) * 0.9
      generated = np.clip(twin + 0.1 * rng.standard_normal((size, size)), -1, 1)
      rows["real"].append(real)
      rows["attention"].append(attention)
      rows["generated"].append(generated)
      rows["fake"].append(attention * generated + (1 - attention) * real)
      # A coarse signed map around the heart border, like an upsampled margin CAM.
      band = _smooth(_border_band(heart, 3))
      scale = 1.0 + 2.0 * i
      rows["cam"].append(scale * (4.0 * band - 0.5 + 0.2 * rng.standard_normal((size, size))))
      rows["heart_mask"].append(heart)
      rows["twin"].append(twin)
      rows["ctr_real"].append(HEART_WIDTH[label] * 1.1 + 0.01 * rng.standard_normal())
      rows["ctr_fake"].append(HEART_WIDTH[1 - label] * 1.1 + 0.01 * rng.standard_normal())
    pred = np.array([preds[i % len(preds)] for i in range(n)])
    phantoms = dataset == "phantoms"
    nan = np.full(n, np.nan)
    parts.append(ExampleMaps(
        id=[f"{CLASS_NAMES[label].replace(' ', '_').lower()}_{i:04d}" for i in range(n)],
        direction=[direction] * n, label=[label] * n, pred=pred,
        pred_translated=1 - pred, prob=rng.uniform(0.5, 1.0, n),
        real=np.stack(rows["real"]), attention=np.stack(rows["attention"]),
        generated=np.stack(rows["generated"]), fake=np.stack(rows["fake"]),
        cam=np.stack(rows["cam"]),
        ctr_real=np.array(rows["ctr_real"]) if phantoms else nan,
        ctr_fake=np.array(rows["ctr_fake"]) if phantoms else nan,
        cam_kind=cam_kind,
        heart_mask=np.stack(rows["heart_mask"]) if phantoms else None,
        twin=np.stack(rows["twin"]) if phantoms else None))
  return ExampleMaps.concatenate(parts)


def make_workdir(root: str | os.PathLike, *, dataset: str = "phantoms", size: int = 32,
                 n: int = 2, empty_cells: tuple[tuple[int, int], ...] = ((1, 0),),
                 with_logs: bool = True) -> str:
  """Writes a synthetic evaluated run under `root` and returns its path."""
  workdir = os.path.join(root, "run")
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics(dataset, size), f, indent=2)
  examples(size, n, dataset, empty_cells).save(os.path.join(workdir, "eval", "examples.npz"))
  if with_logs:
    rng = np.random.default_rng(1)
    noise = lambda: 0.1 * rng.standard_normal()  # noqa: E731
    # The fields train.py logs (steps.py metrics, plus images_per_s).
    logs = {
        "classifier": (10, lambda s: {
            "loss": 0.7 * np.exp(-s / 40) + 0.05, "accuracy": 1 - 0.5 * np.exp(-s / 40),
            "grad_norm": 1.0 / (1 + s / 10)}),
        "gan": (60, lambda s: {
            "g_loss": 2.0 - s / 400 + noise(), "g_adv": 1.0 + noise(),
            "cycle": 0.3 * np.exp(-s / 200), "d_loss": 2.0 + noise(),
            **{f"g_adv_{c}": 0.5 + noise() for c in ("cardiomegaly", "no_finding")},
            **{f"cycle_{c}": 0.15 * np.exp(-s / 200) for c in ("cardiomegaly", "no_finding")},
            **{f"d_{kind}_{c}": 0.5 + noise() for kind in ("real", "fake")
               for c in ("cardiomegaly", "no_finding")},
            **{f"attention_mean_{c}": 0.1 + 0.2 * s / 600 for c in ("cardiomegaly", "no_finding")},
            **{f"grad_norm_{n}_cardiomegaly": 0.5 + abs(noise()) for n in ("gen", "att", "dis")}}),
    }
    for stage, (count, row) in logs.items():
      os.makedirs(os.path.join(workdir, stage), exist_ok=True)
      with open(os.path.join(workdir, stage, "metrics.jsonl"), "w") as f:
        for step in range(10, 10 * count + 10, 10):
          f.write(json.dumps({"step": step, **{k: float(v) for k, v in row(step).items()},
                              "images_per_s": 100.0}) + "\n")
        f.write('{"step": 99999, "loss"')  # a line cut short by a kill
  return workdir
