"""Evaluation: the classifier on original and translated test images, its decision map, the attention, scores.

Writes <workdir>/metrics.json (the run's numbers) and <workdir>/eval/examples.npz
(the cases the figures show, `examples.ExampleMaps`). Paper Table 2, Fig. 4
and Fig. 5, plus measurements against ground truth:

* phantoms: the counterfactual twin of every test image (the same phantom
  with the other label) gives the exact truth of *where* the classes differ
  (`metrics.truth_support`) and *what* the translation should produce; the
  heart's size is read by the CTR regressor and by a model-free ruler
  (ruler.py).
* NIH: the expert Cardiomegaly boxes, beside their chance levels (the box's
  area share, a prior map, a fixed pointer).

Every per-image score is computed on the device inside one jitted function
that returns per-batch sums; only those scalars, and the few cases the
figures show, come to the host. Host memory stays flat as the test set grows.
"""
import csv
import datetime
import io
import json

import jax
import jax.numpy as jnp
import numpy as np

from agcg_jax import audit as audit_lib
from agcg_jax import cam as cam_lib
from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import files
from agcg_jax import metrics as M
from agcg_jax import progress as progress_lib
from agcg_jax import ruler
from agcg_jax import segment
from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import workdir as wd
from agcg_jax.data import pipeline
from agcg_jax.data.records import (CLASS_KEYS, CLASS_NAMES, DIRECTIONS, NUM_CLASSES, direction_of,
                                   to_float, to_uint8)
from agcg_jax.distributed import is_main_process
from agcg_jax.errors import UserError
from agcg_jax.examples import ExampleMaps
from agcg_jax.models.discriminator import trunk_geometry
from agcg_jax.steps import translate

# Maps scored by their mass against the truth (same transform for all: metrics.positive).
SCORED_MAPS = ("attention", "cam", "diff", "prior")
# Against NIH boxes the prior and the fixed pointer come from boxes alone (metrics.box_baselines).
BOX_MAPS = ("attention", "cam", "diff")


def _device_batch(batch: dict) -> dict:
  """The numeric fields the jitted evaluation needs, as numpy (images in [-1, 1])."""
  out = {"image": batch["image"], "label": batch["label"].astype(np.int32),
         "valid": batch["valid"].astype(np.float32)}
  if "twin_image" in batch:
    out["twin"] = to_float(batch["twin_image"])[..., 0]
    out["body"] = batch["body_mask"][..., 0].astype(np.float32)
  if "ctr" in batch:
    out["ctr"] = batch["ctr"].astype(np.float32)
  if "lung_mask" in batch:  # outlined radiographs: the drawn heart and lungs
    out["heart"] = batch["heart_mask"][..., 0].astype(np.float32)
    out["lungs"] = batch["lung_mask"][..., 0].astype(np.float32)
  if "has_cardiomegaly_box" in batch:
    out["box"] = batch["cardiomegaly_box"].astype(np.float32)
    out["has_box"] = batch["has_cardiomegaly_box"].astype(np.float32)
  return out


def _eval_fn(cls_model, gan_models, ctr_model, *, size, geometry, cam_kind, threshold_grey,
             seg_model=None):
  """The jitted per-batch computation: (sums of every score, maps for the figures).

  Every image goes into the other class: No Finding -> Cardiomegaly and back.
  """
  def fn(cls_params, gan_params, ctr_params, prior, b, seg_params=None):
    images, labels, valid = b["image"], b["label"], b["valid"]
    x = images[..., 0]
    logits, cams = cam_lib.logits_and_cam(cls_model, cls_params, images)
    pred = jnp.argmax(logits, -1)
    decision = cam_lib.decision_maps(cams, pred)[cam_kind]
    cam = cam_lib.upsample(decision, size, *geometry)
    outs = {k: translate(gan_models, gan_params, k, images) for k in CLASS_KEYS}
    to_nf = (labels == 1)[:, None, None, None]  # a Cardiomegaly source goes to No Finding
    pick = lambda i: jnp.where(to_nf, outs[CLASS_KEYS[0]][i], outs[CLASS_KEYS[1]][i])[..., 0]
    fake, att, gen = pick(0), pick(1), pick(2)
    pred_t = jnp.argmax(cls_model.apply({"params": cls_params}, fake[..., None]), -1)
    diff = jnp.abs(fake - x)
    maps = {"attention": att, "cam": cam, "diff": diff}

    s = {}
    add = lambda name, per_image: s.__setitem__(name, jnp.sum(per_image.astype(jnp.float32) * valid))
    y0 = (labels == 0).astype(jnp.float32)
    add("n", jnp.ones_like(valid))
    for i in range(NUM_CLASSES):
      for j in range(NUM_CLASSES):
        add(f"conf_o_{i}{j}", (labels == i) & (pred == j))
        add(f"conf_t_{i}{j}", (labels == i) & (pred_t == j))
      add(f"flips_y{i}", (labels == i) & (pred_t != pred))
    add("r_cam_attention", M.pearson(cam, att))

    if "twin" in b:
      twin, body = b["twin"], b["body"]
      support = M.truth_support(x, twin, body, threshold_grey)
      truth = jnp.abs(twin - x)
      maps["prior"] = jnp.broadcast_to(prior, x.shape)
      add("supp_area", M.area(support))
      add("body_area", M.area(body))
      for name, m in maps.items():
        pos = M.positive(m)
        add(f"truth_in_{name}", M.region_mass(pos, support))
        add(f"truth_all_{name}", M.total_mass(pos))
        add(f"truth_r_{name}", M.pearson(m, truth, body))
        add(f"truth_iou_{name}", M.topk_iou(m, support, within=body))
      pred_twin = jnp.argmax(cls_model.apply({"params": cls_params}, twin[..., None]), -1)
      add("flip_twin", pred_twin != pred)
      add("mae_fake_twin", M.mean_abs(fake, twin))
      add("mae_real_twin", M.mean_abs(x, twin))
      outside = body.astype(bool) & ~support
      add("change_in", M.region_mass(diff, support))
      add("change_out", M.region_mass(diff, outside))
      add("area_out", M.area(outside))
      # The model-free ruler on real, translated and twin images.
      # An image it cannot measure (NaN) counts as a wrong direction.
      rr, rf, rt = (ruler.silhouette_ctr(v) for v in (x, fake, twin))
      both = rr["valid"] & rf["valid"]
      shift = jnp.where(both, rf["ctr"] - rr["ctr"], 0.0)
      add("ruler_dir", M.direction_correct(rr["ctr"], rf["ctr"], labels == 0))
      add("ruler_twin_order", M.direction_correct(rr["ctr"], rt["ctr"], labels == 0))
      add("ruler_valid", rr["valid"])
      add("ruler_valid_fake", rf["valid"])
      add("ruler_shift_y0", shift * y0)
      add("ruler_shift_y1", shift * (1.0 - y0))
      add("ruler_both_y0", both * y0)
      add("ruler_both_y1", both * (1.0 - y0))
      if "ctr" in b:
        add("ruler_abs_err", jnp.where(rr["valid"], jnp.abs(rr["ctr"] - b["ctr"]), 0.0))

    # Per image (eval/per_image.csv): how much the translation changed, and where.
    per_image = {"attention_mean": jnp.mean(att, axis=(1, 2)), "change_mean": jnp.mean(diff, axis=(1, 2))}
    if "heart" in b:
      # Drawn outlines: mass near the heart's lateral borders (they set the CTR) over the
      # band's share of the thorax; the prior is the mean training band.
      band = M.lateral_border_band(b["heart"], M.border_width(size))
      thorax = M.thorax_mask(b["heart"], b["lungs"])
      maps["prior"] = jnp.broadcast_to(prior, x.shape)
      border = band & thorax
      add("border_area", M.area(border))
      add("thorax_area", M.area(thorax))
      border_share = M.area(border) / jnp.maximum(M.area(thorax), 1.0)
      for name, m in maps.items():
        pos = M.positive(m)
        inside, total = M.region_mass(pos, border), M.total_mass(pos)
        add(f"border_in_{name}", inside)
        add(f"border_all_{name}", total)
        if name in ("attention", "diff"):  # the same score for one image
          per_image[f"{name}_border_enrichment"] = (
              inside / jnp.maximum(total, 1e-12) / jnp.maximum(border_share, 1e-12))

    if seg_model is not None:
      # The segmenter measures the CTR of the image and of its translation.
      s_real, v_real = segment.ctr_of(seg_model.apply({"params": seg_params}, images))
      s_fake, v_fake = segment.ctr_of(seg_model.apply({"params": seg_params}, fake[..., None]))
      both = v_real & v_fake
      shift = jnp.where(both, s_fake - s_real, 0.0)
      add("seg_valid", v_real)
      add("seg_both", both)
      add("seg_dir", both & M.direction_correct(s_real, s_fake, labels == 0))
      add("seg_shift_y0", shift * y0)
      add("seg_shift_y1", shift * (1.0 - y0))
      add("seg_both_y0", both * y0)
      add("seg_both_y1", both * (1.0 - y0))
      add("seg_cross", both & jnp.where(labels == 0, s_fake > 0.5, s_fake < 0.5))
      if "ctr" in b:
        t, r = b["ctr"], jnp.where(v_real, s_real, 0.0)
        add("seg_abs_err", jnp.where(v_real, jnp.abs(s_real - t), 0.0))
        add("seg_abs_err_fixed", jnp.where(v_real, jnp.abs(0.5 - t), 0.0))
        for k, v in (("x", r), ("y", t), ("xx", r * r), ("yy", t * t), ("xy", r * t)):
          add(f"seg_s{k}", jnp.where(v_real, v, 0.0))

    if ctr_model is not None:
      c_real = ctr_model.apply({"params": ctr_params}, images)[:, 0]
      c_fake = ctr_model.apply({"params": ctr_params}, fake[..., None])[:, 0]
      add("ctr_dir", M.direction_correct(c_real, c_fake, labels == 0))
      add("ctr_shift_y0", (c_fake - c_real) * y0)
      add("ctr_shift_y1", (c_fake - c_real) * (1.0 - y0))
      add("ctr_cross", jnp.where(labels == 0, c_fake > 0.5, c_fake < 0.5))
      if "ctr" in b:
        add("ctr_abs_err", jnp.abs(c_real - b["ctr"]))
        add("ctr_abs_err_fixed", jnp.abs(0.5 - b["ctr"]))
    elif seg_model is not None:  # the segmenter's CTR (NaN where it finds no heart or lungs)
      c_real, c_fake = jnp.where(v_real, s_real, jnp.nan), jnp.where(v_fake, s_fake, jnp.nan)
    else:
      c_real = c_fake = jnp.full(labels.shape, jnp.nan)

    if "box" in b:
      boxed = b["has_box"]
      in_box = M.box_mask(b["box"], size)
      add("n_box", boxed)
      add("box_area", boxed * M.area(in_box) / (size * size))
      for name in BOX_MAPS:
        pos = M.positive(maps[name])
        add(f"box_in_{name}", boxed * M.region_mass(pos, in_box))
        add(f"box_all_{name}", boxed * M.total_mass(pos))
        add(f"box_point_{name}", boxed * M.pointing(maps[name], b["box"]))

    figure = {"pred": pred, "pred_translated": pred_t,
              "prob": jnp.take_along_axis(jax.nn.softmax(logits, -1), pred[:, None], 1)[:, 0],
              "real": x, "attention": att, "generated": gen, "fake": fake, "cam": cam,
              "ctr_real": c_real, "ctr_fake": c_fake, "per_image": per_image}
    if "twin" in b:
      figure["twin"] = b["twin"]
    return s, figure
  return fn


def summarize(sums: dict, box_baselines: dict | None = None) -> dict:
  """metrics.json entries from the pooled sums of `_eval_fn` (pure numpy; unit-tested)."""
  g = lambda k: float(sums[k])
  n = g("n")
  if n == 0:
    raise UserError("the test set is empty: nothing to evaluate")
  conf = lambda kind: [[int(round(g(f"conf_{kind}_{i}{j}"))) for j in range(NUM_CLASSES)]
                       for i in range(NUM_CLASSES)]
  co, ct = conf("o"), conf("t")
  per_class = [sum(co[i]) for i in range(NUM_CLASSES)]
  m = {
      "num_test": int(round(n)),
      "class_names": list(CLASS_NAMES),
      "accuracy_original": sum(co[i][i] for i in range(NUM_CLASSES)) / n,
      "accuracy_translated": sum(ct[i][i] for i in range(NUM_CLASSES)) / n,
      "accuracy_chance": max(per_class) / n,
      "confusion_original": co,
      "confusion_translated": ct,
      # A flip: the classifier's prediction on the translation differs from that on the image.
      "flip_rate": sum(g(f"flips_y{c}") for c in range(NUM_CLASSES)) / n,
      "flip_rate_by_class": {CLASS_NAMES[c]: (g(f"flips_y{c}") / per_class[c] if per_class[c] else None)
                             for c in range(NUM_CLASSES)},
      "cam_attention_pearson": g("r_cam_attention") / n,
  }
  if "supp_area" in sums:
    share = M.pooled_ratio(g("supp_area"), g("body_area"))
    m["truth_support_share"] = share
    m["truth_enrichment_chance"] = 1.0
    m["truth_topk_iou_chance"] = M.topk_iou_chance(share)
    for name in SCORED_MAPS:
      m[f"{name}_truth_enrichment"] = M.enrichment(g(f"truth_in_{name}"), g(f"truth_all_{name}"),
                                                   g("supp_area"), g("body_area"))
      m[f"{name}_truth_pearson"] = g(f"truth_r_{name}") / n
      m[f"{name}_truth_topk_iou"] = g(f"truth_iou_{name}") / n
    m["flip_rate_twin"] = g("flip_twin") / n
    m["counterfactual_error"] = M.pooled_ratio(g("mae_fake_twin"), g("mae_real_twin"))
    m["counterfactual_error_identity"] = 1.0
    m["change_inside_truth"] = M.pooled_ratio(g("change_in"), g("supp_area")) / M.GREY
    m["change_outside_truth"] = M.pooled_ratio(g("change_out"), g("area_out")) / M.GREY
    m["direction_chance"] = 0.5
    m["ctr_direction_correct_model_free"] = g("ruler_dir") / n
    m["ctr_shift_model_free"] = _per_direction(
        sums, "ruler_shift", [g(f"ruler_both_y{c}") for c in range(NUM_CLASSES)])
    m["ruler_twin_order"] = g("ruler_twin_order") / n
    m["ruler_measured"] = g("ruler_valid") / n
    m["ruler_measured_translated"] = g("ruler_valid_fake") / n
    if "ruler_abs_err" in sums:
      m["ruler_mae"] = M.pooled_ratio(g("ruler_abs_err"), g("ruler_valid"))
  if "ctr_dir" in sums:
    m["direction_chance"] = 0.5
    m["ctr_direction_correct"] = g("ctr_dir") / n
    m["ctr_shift"] = _per_direction(sums, "ctr_shift", per_class)
    m["ctr_crosses_threshold"] = g("ctr_cross") / n
    if "ctr_abs_err" in sums:
      m["ctr_regressor_mae"] = g("ctr_abs_err") / n
      m["ctr_mae_fixed_prior"] = g("ctr_abs_err_fixed") / n
  if "border_area" in sums:
    m["heart_border_share"] = M.pooled_ratio(g("border_area"), g("thorax_area"))
    m["heart_border_enrichment_chance"] = 1.0
    for name in SCORED_MAPS:
      m[f"{name}_heart_border_enrichment"] = M.enrichment(
          g(f"border_in_{name}"), g(f"border_all_{name}"), g("border_area"), g("thorax_area"))
  if "seg_valid" in sums:
    m["direction_chance"] = 0.5
    m["ctr_direction_correct"] = g("seg_dir") / n
    m["ctr_ruler"] = "segmenter"
    m["ctr_shift"] = _per_direction(sums, "seg_shift", [g(f"seg_both_y{c}") for c in range(NUM_CLASSES)])
    m["ctr_crosses_threshold"] = g("seg_cross") / n
    m["ctr_ruler_measured"] = g("seg_valid") / n
    if "seg_abs_err" in sums:
      m["ctr_ruler_mae"] = M.pooled_ratio(g("seg_abs_err"), g("seg_valid"))
      m["ctr_mae_fixed_prior"] = M.pooled_ratio(g("seg_abs_err_fixed"), g("seg_valid"))
      m["ctr_ruler_pearson"] = M.pooled_pearson(*(g(f"seg_s{k}") for k in ("x", "y", "xx", "yy", "xy")),
                                                g("seg_valid"))
  if "n_box" in sums and g("n_box") > 0:
    nb = g("n_box")
    m["num_boxed"] = int(round(nb))
    m["box_area_share"] = g("box_area") / nb
    m["box_enrichment_chance"] = 1.0
    for name in BOX_MAPS:
      share = M.pooled_ratio(g(f"box_in_{name}"), g(f"box_all_{name}"))
      m[f"{name}_box_enrichment"] = share / m["box_area_share"]
      m[f"{name}_pointing"] = g(f"box_point_{name}") / nb
    m.update(box_baselines or {})
  return m


def _per_direction(sums, key, per_class) -> dict:
  """{direction: mean over its source class} from `{key}_y0` / `{key}_y1` sums."""
  return {direction_of(c): (float(sums[f"{key}_y{c}"]) / per_class[c] if per_class[c] else None)
          for c in range(NUM_CLASSES)}


class _Examples:
  """Collects up to n cases per direction and per (true, predicted) cell, fetching only those."""

  def __init__(self, n: int, cam_kind: str, size: int):
    self.n, self.cam_kind, self.size = n, cam_kind, size
    self.per_direction = {d: 0 for d in DIRECTIONS}
    self.per_cell = {}
    self.parts = []

  def wanted(self, labels, preds, valid) -> list[int]:
    keep = []
    for i in np.flatnonzero(valid):
      d, cell = direction_of(labels[i]), (int(labels[i]), int(preds[i]))
      if self.per_direction[d] < self.n or self.per_cell.get(cell, 0) < self.n:
        self.per_direction[d] += 1
        self.per_cell[cell] = self.per_cell.get(cell, 0) + 1
        keep.append(int(i))
    return keep

  def add(self, batch: dict, figure: dict, rows: list[int], heart_mask) -> None:
    if not rows:
      return
    idx = jnp.asarray(rows)
    got = jax.device_get({k: v[idx] for k, v in figure.items() if k != "per_image"})
    labels = np.asarray(batch["label"])[rows]
    ids = (np.asarray(batch["id"])[rows] if "id" in batch
           else np.asarray([str(r) for r in rows]))
    self.parts.append(ExampleMaps(
        id=ids, direction=[direction_of(v) for v in labels], label=labels,
        pred=got["pred"], pred_translated=got["pred_translated"], prob=got["prob"],
        real=got["real"], attention=got["attention"], generated=got["generated"],
        fake=got["fake"], cam=got["cam"], ctr_real=got["ctr_real"], ctr_fake=got["ctr_fake"],
        cam_kind=self.cam_kind,
        heart_mask=None if heart_mask is None else np.asarray(heart_mask)[rows][..., 0],
        twin=got.get("twin")))

  def result(self) -> ExampleMaps:
    return (ExampleMaps.concatenate(self.parts) if self.parts
            else ExampleMaps.empty(self.size, cam_kind=self.cam_kind))


class _PerImage:
  """One row of scalars per scored image: eval/per_image.csv (which images moved, and how)."""

  def __init__(self):
    self.rows = []

  _FIXED = ("pred", "pred_translated", "prob", "ctr_real", "ctr_fake")

  def add(self, batch: dict, figure: dict, valid: np.ndarray) -> None:
    got = jax.device_get({k: figure[k] for k in self._FIXED} | figure["per_image"])
    labels = np.asarray(batch["label"])
    ids = np.asarray(batch["id"]) if "id" in batch else None
    for i in np.flatnonzero(valid):
      row = {"id": str(ids[i]) if ids is not None else str(len(self.rows)),
             "label": CLASS_NAMES[int(labels[i])], "direction": direction_of(labels[i]),
             "pred": CLASS_NAMES[int(got["pred"][i])],
             "pred_translated": CLASS_NAMES[int(got["pred_translated"][i])],
             "prob": float(got["prob"][i]), "ctr_real": float(got["ctr_real"][i]),
             "ctr_fake": float(got["ctr_fake"][i])}
      row["ctr_change"] = row["ctr_fake"] - row["ctr_real"]
      row.update({k: float(v[i]) for k, v in got.items() if k not in self._FIXED})
      self.rows.append(row)

  def save(self, path: str) -> None:
    if not self.rows:
      return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in self.rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    files.write_text(path, buf.getvalue())


class _BoxSwap:
  """Keeps the boxed images' maps (positive part, pooled to metrics.SWAP_GRID) for the box-swap margin.

  With several processes each keeps its own images' maps; `result` gathers them
  all, so every process computes the margin of the whole test set.
  """

  def __init__(self):
    self.maps = {name: [] for name in BOX_MAPS}
    self.boxes = []
    self.scored = False  # the dataset has boxes (the same on every process)

  def add(self, batch: dict, figure: dict, valid: np.ndarray) -> None:
    self.scored = True
    keep = valid & (np.asarray(batch["has_cardiomegaly_box"]) > 0)
    if not keep.any():
      return
    idx = np.nonzero(keep)[0]
    got = jax.device_get({k: figure[k] for k in ("attention", "cam", "fake", "real")})
    maps = {"attention": got["attention"], "cam": got["cam"],
            "diff": np.abs(got["fake"] - got["real"])}
    for name in BOX_MAPS:
      self.maps[name].append(M.pool_map(np.maximum(np.asarray(maps[name])[idx], 0.0)))
    self.boxes.append(np.asarray(batch["cardiomegaly_box"], np.float32)[idx])

  def result(self, size: int, seed: int) -> dict:
    """{<map>_box_swap_margin, <map>_box_swap_margin_ci} over every process's boxed images."""
    if not self.scored:
      return {}
    local = lambda parts, empty: np.concatenate(parts) if parts else empty
    boxes = _gather_rows(local(self.boxes, np.zeros((0, 4), np.float32)))
    if not len(boxes):
      return {}
    out = {}
    for name in BOX_MAPS:
      maps = _gather_rows(local(self.maps[name], M.pool_map(np.zeros((0, size, size), np.float32))))
      margins = M.box_swap_margins(maps, boxes, size)
      if np.isfinite(margins).any():
        out[f"{name}_box_swap_margin"] = float(np.nanmean(margins))
        out[f"{name}_box_swap_margin_ci"] = M.bootstrap_ci(margins, seed=seed)
    return out


def _training_priors(ddir: str, size: int, threshold_grey: float, batch_size: int,
                     audit_images: int = 0):
  """(prior map [S, S], training boxes [M, 4], audit sample) from the *training* split.

  Phantoms: the mean truth support of the training images (where hearts
  usually differ). Outlined radiographs: the mean lateral border band of the
  training hearts (where heart borders usually are). NIH: the training Cardiomegaly boxes (metrics.box_baselines
  turns them into a prior map and a fixed pointer). The audit sample is
  (uint8 images [N, S, S], labels [N]) of at most `audit_images` training
  records, every k-th (a split stored sorted by class is sampled evenly), for
  audit.py.
  """
  source = pipeline.open_source(ddir, "train")
  stride = max(1, -(-len(source) // audit_images)) if audit_images else 0
  support_fn = jax.jit(lambda x, t, b: M.truth_support(x, t, b, threshold_grey).astype(jnp.float32))
  band_fn = jax.jit(lambda h: M.lateral_border_band(h, M.border_width(size)).astype(jnp.float32))
  total, count, boxes, images, labels = np.zeros((size, size)), 0.0, [], [], []
  position = 0
  for batch in pipeline.eval_batches(source, batch_size=batch_size):
    valid = np.asarray(batch["valid"], bool)
    if stride:
      take = valid & ((position + np.arange(len(valid))) % stride == 0)
      images.append(to_uint8(np.asarray(batch["image"])[take][..., 0]))
      labels.append(np.asarray(batch["label"])[take])
    position += int(valid.sum())
    if "twin_image" in batch:
      sup = support_fn(batch["image"][..., 0], to_float(batch["twin_image"])[..., 0],
                       batch["body_mask"][..., 0])
      total += np.asarray(sup)[valid].sum(0)
      count += valid.sum()
    elif "lung_mask" in batch:  # outlined hearts: the mean training border band
      total += np.asarray(band_fn(batch["heart_mask"][..., 0]))[valid].sum(0)
      count += valid.sum()
    elif "has_cardiomegaly_box" in batch:
      boxes.append(_boxes_of(batch))
    elif not stride:
      break  # no truth of either kind and no audit: nothing more to read
  prior = (total / count if count else np.zeros((size, size))).astype(np.float32)
  sample = ((np.concatenate(images)[:audit_images], np.concatenate(labels)[:audit_images])
            if images else (np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64)))
  return prior, (np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)), sample


# Non-image fields the audit reads where a dataset's records carry them (NIH: from the label file).
AUDIT_FIELDS = ("view", "sex", "age")


def _audit_fields(ddir: str, n: int, audit_images: int) -> dict | None:
  """{field: values} of the audit sample's records (the same every-k-th records), or None."""
  source = pipeline.open_source(ddir, "train")
  if not len(source) or not audit_images:
    return None
  first = source[0]
  names = [f for f in AUDIT_FIELDS if f in first]
  if not names:
    return None
  stride = max(1, -(-len(source) // audit_images))
  rows = [source[int(i)] for i in np.arange(0, len(source), stride)[:n]]
  decode = lambda v: v.decode() if isinstance(v, bytes) else v
  out = {f: [decode(r[f]) for r in rows] for f in names}
  if "age" in out:  # 10-year bands, as the cohort controls match them
    out["age"] = [f"{int(a) // 10 * 10}s" if int(a) >= 0 else "unknown" for a in out["age"]]
  return out


def _audit(sample, prior, boxes: np.ndarray, size: int, seed: int, fields=None) -> dict:
  """The confounder audit (audit.py) of the training sample, with the heart region it blanked."""
  images, labels = sample
  box, source = audit_lib.heart_box_of_prior(prior), "prior"
  if box is None:
    box, source = audit_lib.heart_box_of_boxes(boxes, size), "boxes"
  if box is None:
    box, source = audit_lib.STAND_IN_HEART_BOX, "stand-in (mean NIH sample box)"
  out = audit_lib.audit(images, labels, box_xyxy_fraction=box, seed=seed, fields=fields)
  out.update({"audit_images": int(len(labels)), "audit_heart_box": [round(v, 4) for v in box],
              "audit_heart_box_source": source})
  return out


def _boxes_of(batch: dict) -> np.ndarray:
  """[n, 4] Cardiomegaly boxes of the batch's valid, boxed records."""
  keep = np.asarray(batch["valid"], bool) & (np.asarray(batch["has_cardiomegaly_box"]) > 0)
  return np.asarray(batch["cardiomegaly_box"], np.float32)[keep]


def _gather_rows(rows: np.ndarray) -> np.ndarray:
  """Every process's rows [n_i, ...] (the same trailing shape), concatenated in process order."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(rows)], np.int32))).reshape(-1)
  padded = np.zeros((int(counts.max()), *rows.shape[1:]), rows.dtype)
  padded[:len(rows)] = rows
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), -1, *rows.shape[1:])
  return np.concatenate([every[i, :c] for i, c in enumerate(counts)])


def _pool_processes(sums: dict) -> dict:
  """Every process evaluated its own block of the test set: add their sums."""
  if jax.process_count() == 1:
    return sums
  from jax.experimental import multihost_utils
  keys = sorted(sums)
  values = np.asarray([sums[k] for k in keys], np.float64)
  total = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(keys)).sum(0)
  return dict(zip(keys, total.tolist()))


def evaluate(config, workdir: str, progress: bool = True) -> dict:
  """Runs the classifier, the AG-CycleGAN and (phantoms) the CTR regressor over the test set."""
  mesh = sh.data_mesh(jax.local_devices())
  size = config.data.image_size
  cam_kind = config.eval.cam
  if cam_kind not in cam_lib.CAM_KINDS:
    raise UserError(f"eval.cam={cam_kind!r}: use one of {', '.join(cam_lib.CAM_KINDS)}")
  cls_params, cls_step = ckpt_lib.restore_params(workdir, "classifier", S.classifier_init_fn(config), mesh,
                                              config)
  cls_params = cls_params["classifier"]
  gan_params, gan_step = ckpt_lib.restore_params(workdir, "gan", S.gan_init_fn(config), mesh, config)
  ctr_params = ctr_model = None
  scored = wd.eval_config(config)  # the dataset scored: eval_data, or the test split of data
  if config.data.kind == "phantoms" and scored.data.kind == "phantoms":
    ctr_params, _ = ckpt_lib.restore_params(workdir, "ctr", S.ctr_init_fn(config), mesh, config)
    ctr_params = ctr_params["ctr"]
    ctr_model = S.ctr_model(config)
  seg_model = seg_params = None
  if scored.data.kind == "ctr_masks":
    g = config.segmenter
    seg_params, _ = ckpt_lib.restore_params(
        workdir, "segmenter", segment.segmenter_init_fn(g.width, size, g.lr, g.steps, depth=g.depth,
                                                        patch=g.patch), mesh, config)
    seg_params = seg_params[segment.SEG]
    seg_model = segment.segmenter_model(g.width, g.depth, g.patch)
  fn = jax.jit(_eval_fn(S.classifier_model(config), S.gan_models(config.model), ctr_model,
                        size=size, geometry=trunk_geometry(config.model.cls_layers),
                        cam_kind=cam_kind, threshold_grey=config.eval.truth_threshold_grey,
                        seg_model=seg_model))
  ddir = wd.dataset_dir(scored, workdir)
  wd.check_image_size(scored, ddir)
  n_local = len(jax.local_devices())
  batch_size = -(-config.eval.batch_size // n_local) * n_local
  # The audit reads the data the networks learned from: the translation shows what differs
  # between *those* cohorts (the scored set may be another one, eval_data).
  trained_on_scored = scored is config
  prior, train_boxes, audit_sample = _training_priors(
      ddir, size, config.eval.truth_threshold_grey, batch_size,
      config.eval.audit_images if trained_on_scored else 0)
  if config.eval.audit_images and not trained_on_scored:
    _, _, audit_sample = _training_priors(wd.dataset_dir(config, workdir), size,
                                          config.eval.truth_threshold_grey, batch_size,
                                          config.eval.audit_images)
  source = pipeline.open_source(ddir, "test")
  examples = _Examples(config.eval.num_figure_examples, cam_kind, size)
  sums, seen, test_boxes, swap, per_image = {}, 0, [], _BoxSwap(), _PerImage()
  batches = pipeline.eval_batches(source, batch_size=batch_size, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())

  def consume(batch, s, figure):
    """Host side of one batch: the sums, the per-image rows, the examples, the boxed maps."""
    for k, v in jax.device_get(s).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    valid = np.asarray(batch["valid"], bool)
    if "has_cardiomegaly_box" in batch:
      test_boxes.append(_boxes_of(batch))
      swap.add(batch, figure, valid)
    per_image.add(batch, figure, valid)
    preds = np.asarray(jax.device_get(figure["pred"]))
    rows = examples.wanted(np.asarray(batch["label"]), preds, valid)
    examples.add(batch, figure, rows, batch.get("heart_mask"))

  # One batch ahead: the next batch is read and dispatched before the host waits on this
  # one's results, so reading and the host's share overlap the device's work.
  pending = None
  for batch in progress_lib.bar(batches, desc="evaluate", unit="batch",
                                disable=not (progress and is_main_process())):
    dev = sh.to_global(_device_batch(batch), mesh)
    out = fn(cls_params, gan_params, ctr_params, prior, dev, seg_params)
    if pending is not None:
      consume(*pending)
    pending = (batch, *out)
    seen += int(np.asarray(batch["valid"], bool).sum())
    # (every process yields the same number of batches, so they stop together)
    if config.eval.max_examples and seen * jax.process_count() >= config.eval.max_examples:
      break
  if pending is not None:
    consume(*pending)
  baselines = None
  if test_boxes:
    every = _gather_rows(np.concatenate(test_boxes))
    baselines = M.box_baselines(every, train_boxes, size) if len(every) else None
  metrics = summarize(_pool_processes(sums), baselines)
  metrics.update(swap.result(size, config.seed))
  if config.eval.audit_images:
    box_rows = train_boxes if len(train_boxes) else (
        _gather_rows(np.concatenate(test_boxes)) if test_boxes else train_boxes)
    audit_ddir = ddir if trained_on_scored else wd.dataset_dir(config, workdir)
    fields = _audit_fields(audit_ddir, len(audit_sample[1]), config.eval.audit_images)
    metrics.update(_audit(audit_sample, prior, box_rows, size, config.seed, fields))
  metrics.update({
      "cam_kind": cam_kind,
      "dataset": scored.data.kind,
      "trained_on": config.data.kind,
      "image_size": size,
      "classifier_step": cls_step,
      "gan_step": gan_step,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
      "config": json.loads(json.dumps(config.to_dict(), default=list)),
  })
  # Each process lists its own images (per_image.csv on one process, per_image-<i>.csv on several).
  per_image.save(wd.per_image_csv(workdir, jax.process_index(), jax.process_count()))
  if is_main_process():
    examples.result().save(wd.examples_npz(workdir))
    files.write_json(wd.metrics_json(workdir), metrics)
  return metrics
