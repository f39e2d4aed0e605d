"""A synthetic evaluated run (metrics.json, eval/examples.npz, metrics.jsonl) for report tests.

The files follow the format `agcg evaluate` and training write; the images
are tiny drawn chest phantoms so the figures look like the real thing.
"""
import json
import os

import numpy as np

CLASS_NAMES = ["No Finding", "Cardiomegaly"]
# Chosen so the formatted numbers are unambiguous: 16/20 and 6/20.
CONFUSION_ORIGINAL = [[9, 1], [3, 7]]
CONFUSION_TRANSLATED = [[2, 8], [4, 6]]
ACCURACY_ORIGINAL_TEXT = "80.0%"
ACCURACY_TRANSLATED_TEXT = "30.0%"


def _chest(size: int, heart_halfwidth: float, rng) -> tuple[np.ndarray, np.ndarray]:
  """A phantom [S, S] in [-1, 1] and its heart mask [S, S] in {0, 1}."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1  # [-1, 1]
  body = (x / 0.9) ** 2 + (y / 0.95) ** 2 < 1
  lungs = (((x + 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1) | (
      ((x - 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.6) ** 2 < 1)
  heart = ((x - 0.05) / heart_halfwidth) ** 2 + ((y - 0.3) / 0.3) ** 2 < 1
  image = np.full((size, size), -1.0)
  image[body] = 0.3
  image[lungs] = -0.6
  image[heart] = 0.5
  image += 0.05 * rng.standard_normal((size, size))
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
  """A metrics.json object as `agcg evaluate` writes it."""
  m = {
      "dataset": dataset,
      "image_size": size,
      "date": "2026-11-27T13:00:00",
      "device": "cpu (2 devices)",
      "num_test": 20,
      "class_names": CLASS_NAMES,
      "accuracy_original": 0.8,
      "accuracy_translated": 0.3,
      "confusion_original": CONFUSION_ORIGINAL,
      "confusion_translated": CONFUSION_TRANSLATED,
      "flip_rate": {"No Finding": 0.7, "Cardiomegaly": 0.5},
      "config": {"data": {"image_size": size, "source": dataset},
                 "gan": {"steps": 10, "lr_d": 4e-4},
                 "note": "<script>alert('x')</script>"},
  }
  if dataset == "phantoms":
    m.update(attention_border_enrichment=3.21, cam_border_enrichment=1.87,
             cam_attention_pearson=0.412, ctr_direction_correct=0.85,
             ctr_regressor_mae=0.0123,
             ctr_shift={"to_cardiomegaly": 0.061, "to_no_finding": -0.048})
  else:
    m.update(attention_in_box=0.634, cam_in_box=0.512, attention_pointing=0.75,
             cam_pointing=0.5, num_boxed=4)
  return m


def examples(size: int = 32, n: int = 2, dataset: str = "phantoms",
             empty_cells: tuple[str, ...] = ("cardiomegaly_as_no_finding",),
             seed: int = 0) -> dict[str, np.ndarray]:
  """The arrays of eval/examples.npz; CAM cells named in `empty_cells` have n = 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for direction, (src_w, tgt_w) in {"to_cardiomegaly": (0.25, 0.42),
                                    "to_no_finding": (0.42, 0.25)}.items():
    reals, atts, gens, fakes, masks, ctr_r, ctr_f = [], [], [], [], [], [], []
    for _ in range(n):
      real, heart = _chest(size, src_w, rng)
      target, target_heart = _chest(size, tgt_w, rng)
      attention = np.clip(_border_band(heart) + _border_band(target_heart), 0, 1) * 0.9
      generated = np.clip(target + 0.1 * rng.standard_normal((size, size)), -1, 1)
      fake = attention * generated + (1 - attention) * real
      reals.append(real), atts.append(attention), gens.append(generated)
      fakes.append(fake), masks.append(heart)
      ctr_r.append(src_w * 1.1 + 0.01 * rng.standard_normal())
      ctr_f.append(tgt_w * 1.1 + 0.01 * rng.standard_normal())
    out[f"{direction}_real"] = np.stack(reals).astype(np.float32)
    out[f"{direction}_attention"] = np.stack(atts).astype(np.float32)
    out[f"{direction}_generated"] = np.stack(gens).astype(np.float32)
    out[f"{direction}_fake"] = np.stack(fakes).astype(np.float32)
    source = "no_finding" if direction == "to_cardiomegaly" else "cardiomegaly"
    out[f"{direction}_id"] = np.array([f"{source}_{i:04d}" for i in range(n)])
    if dataset == "phantoms":
      out[f"{direction}_ctr_real"] = np.array(ctr_r, np.float32)
      out[f"{direction}_ctr_fake"] = np.array(ctr_f, np.float32)
      out[f"{direction}_heart_mask"] = np.stack(masks).astype(np.float32)
  for true in ("cardiomegaly", "no_finding"):
    for pred in ("cardiomegaly", "no_finding"):
      key = f"cam_{true}_as_{pred}"
      k = 0 if key[4:] in empty_cells else n
      images, cams = [], []
      for _ in range(k):
        image, heart = _chest(size, 0.42 if true == "cardiomegaly" else 0.25, rng)
        # A coarse map around the heart border, like an upsampled CAM: smooth, with a little noise.
        band = _border_band(heart, 3)
        for _ in range(3):
          band = (band + np.roll(band, 1, 0) + np.roll(band, -1, 0) + np.roll(band, 1, 1)
                  + np.roll(band, -1, 1)) / 5
        cams.append(4.0 * band + 0.2 * rng.standard_normal((size, size)) - 1.0)
        images.append(image)
      out[f"{key}_image"] = np.array(images, np.float32).reshape(k, size, size)
      out[f"{key}_cam"] = np.array(cams, np.float32).reshape(k, size, size)
      out[f"{key}_prob"] = rng.uniform(0.5, 1.0, k).astype(np.float32)
      out[f"{key}_id"] = np.array([f"{true}_{i:04d}" for i in range(k)], dtype=str)
  return out


def make_workdir(root: str | os.PathLike, *, dataset: str = "phantoms", size: int = 32,
                 n: int = 2, empty_cells: tuple[str, ...] = ("cardiomegaly_as_no_finding",),
                 with_logs: bool = True) -> str:
  """Writes a synthetic evaluated run under `root` and returns its path."""
  workdir = os.path.join(root, "run")
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(metrics(dataset, size), f, indent=2)
  np.savez(os.path.join(workdir, "eval", "examples.npz"),
           **examples(size, n, dataset, empty_cells))
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
