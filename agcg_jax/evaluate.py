"""Evaluation: the classifier on original and translated test images, CAM, attention, metrics.

Writes <workdir>/metrics.json (the run's numbers) and <workdir>/eval/examples.npz
(the cases the figures show). Paper Table 2, Fig. 4 and Fig. 5, plus
measurements against ground truth: the phantoms' heart border and CTR, the
NIH expert boxes.
"""
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from agcg_jax import cam as cam_lib
from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import train
from agcg_jax.data import pipeline
from agcg_jax.data.records import CLASS_KEYS, CLASS_NAMES, NUM_CLASSES
from agcg_jax.errors import UserError
from agcg_jax.steps import translate

DIRECTIONS = tuple(f"to_{k}" for k in CLASS_KEYS)  # into the other class of the source


def _eval_fn(cls_model, gan_models, ctr_model, size):
  """The jitted per-batch computation: everything the metrics and figures need."""
  def fn(cls_params, gan_params, ctr_params, images, labels):
    logits, cams = cam_lib.logits_and_cam(cls_model, cls_params, images)
    pred = jnp.argmax(logits, -1)
    up = cam_lib.upsample(cams, size)
    cam_pred = jnp.take_along_axis(up, pred[:, None, None, None], axis=-1)
    # The decision's own map: CAM of the logit margin (pred minus the other
    # class), whose spatial mean plus the bias difference is the margin.
    # Softmax ignores what both class CAMs share; this map does too.
    cam_margin = 2.0 * cam_pred - jnp.sum(up, axis=-1, keepdims=True)
    # Each image goes into the other class: No Finding -> Cardiomegaly and back.
    outs = {k: translate(gan_models, gan_params, k, images) for k in CLASS_KEYS}
    to_cm = (labels == 1)[:, None, None, None]  # the source is Cardiomegaly: translate to No Finding
    pick = lambda i: jnp.where(to_cm, outs[CLASS_KEYS[0]][i], outs[CLASS_KEYS[1]][i])
    fake, att, gen = pick(0), pick(1), pick(2)
    logits_t = cls_model.apply({"params": cls_params}, fake)
    out = {
        "prob": jax.nn.softmax(logits, -1), "pred": pred,
        "pred_translated": jnp.argmax(logits_t, -1),
        "cam": cam_pred[..., 0], "cam_margin": cam_margin[..., 0], "attention": att[..., 0], "generated": gen[..., 0],
        "fake": fake[..., 0],
    }
    if ctr_model is not None:
      out["ctr_real"] = ctr_model.apply({"params": ctr_params}, images)[:, 0]
      out["ctr_fake"] = ctr_model.apply({"params": ctr_params}, fake)[:, 0]
    return out
  return fn


def border_band(mask: np.ndarray, half_width: int) -> np.ndarray:
  """Pixels within `half_width` of the mask's border (inside or outside). mask [S, S] bool."""
  if not mask.any():
    return np.zeros_like(mask, bool)
  inside = ndimage.distance_transform_edt(mask)
  outside = ndimage.distance_transform_edt(~mask)
  return ((inside > 0) & (inside <= half_width)) | ((outside > 0) & (outside <= half_width))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
  den = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / den) if den > 0 else 0.0


def _norm01(x: np.ndarray) -> np.ndarray:
  lo, hi = x.min(), x.max()
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _box_scores(m: np.ndarray, box: np.ndarray) -> tuple[float, bool]:
  """(share of map mass inside box, whether the map's maximum is in it); box = x0, y0, x1, y1."""
  x0, y0, x1, y1 = [int(round(v)) for v in box]
  inside = np.zeros_like(m, bool)
  inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
  total = m.sum()
  share = float(m[inside].sum() / total) if total > 0 else 0.0
  yy, xx = np.unravel_index(np.argmax(m), m.shape)
  return share, bool(inside[yy, xx])


class _Accumulator:
  def __init__(self, size: int, border_width: float, num_examples: int):
    self.half_width = max(1, int(round(border_width * size)))
    self.n_ex = num_examples
    self.labels, self.pred, self.pred_t = [], [], []
    self.ctr = {"real": [], "fake": [], "true": []}
    self.band = {"att_in": 0.0, "att_all": 0.0, "cam_in": 0.0, "cam_all": 0.0, "margin_in": 0.0,
                 "margin_all": 0.0, "area_in": 0.0, "area_all": 0.0}
    self.r, self.r_margin = [], []
    self.box = {"att_share": [], "cam_share": [], "att_point": [], "cam_point": []}
    self.examples = {d: {k: [] for k in ("real", "attention", "generated", "fake", "id",
                                         "ctr_real", "ctr_fake", "heart_mask")} for d in DIRECTIONS}
    self.cams = {}

  def add(self, batch: dict, out: dict) -> None:
    valid = np.asarray(batch["valid"], bool)
    for b in np.nonzero(valid)[0]:
      label, pred = int(batch["label"][b]), int(out["pred"][b])
      self.labels.append(label)
      self.pred.append(pred)
      self.pred_t.append(int(out["pred_translated"][b]))
      att = out["attention"][b].astype(np.float64)
      cam = _norm01(out["cam"][b].astype(np.float64))
      margin = out["cam_margin"][b].astype(np.float64)
      self.r.append(pearson(att, cam))
      self.r_margin.append(pearson(att, margin))
      margin_pos = np.maximum(margin, 0.0)
      if "ctr_real" in out:
        self.ctr["real"].append(float(out["ctr_real"][b]))
        self.ctr["fake"].append(float(out["ctr_fake"][b]))
        self.ctr["true"].append(float(batch["ctr"][b]) if "ctr" in batch else np.nan)
      if "heart_mask" in batch:
        band = border_band(np.asarray(batch["heart_mask"][b])[..., 0] > 0, self.half_width)
        self.band["att_in"] += att[band].sum()
        self.band["att_all"] += att.sum()
        self.band["cam_in"] += cam[band].sum()
        self.band["cam_all"] += cam.sum()
        self.band["margin_in"] += margin_pos[band].sum()
        self.band["margin_all"] += margin_pos.sum()
        self.band["area_in"] += band.sum()
        self.band["area_all"] += band.size
      if "has_cardiomegaly_box" in batch and int(batch["has_cardiomegaly_box"][b]):
        box = np.asarray(batch["cardiomegaly_box"][b])
        for name, m in (("att", att), ("cam", cam)):
          share, hit = _box_scores(m, box)
          self.box[f"{name}_share"].append(share)
          self.box[f"{name}_point"].append(hit)
      d = DIRECTIONS[1 - label]  # a Cardiomegaly source goes to No Finding
      ex = self.examples[d]
      if len(ex["real"]) < self.n_ex:
        ex["real"].append(np.asarray(batch["image"][b])[..., 0])
        ex["attention"].append(out["attention"][b])
        ex["generated"].append(out["generated"][b])
        ex["fake"].append(out["fake"][b])
        ex["id"].append(str(batch["id"][b]) if "id" in batch else str(len(self.labels)))
        if "ctr_real" in out:
          ex["ctr_real"].append(float(out["ctr_real"][b]))
          ex["ctr_fake"].append(float(out["ctr_fake"][b]))
        if "heart_mask" in batch:
          ex["heart_mask"].append(np.asarray(batch["heart_mask"][b])[..., 0].astype(np.float32))
      cell = self.cams.setdefault((label, pred), {"image": [], "cam": [], "prob": [], "id": []})
      if len(cell["image"]) < self.n_ex:
        cell["image"].append(np.asarray(batch["image"][b])[..., 0])
        cell["cam"].append(out["cam"][b])
        cell["prob"].append(float(out["prob"][b][pred]))
        cell["id"].append(str(batch["id"][b]) if "id" in batch else "")

  def merge_processes(self) -> None:
    """Every process evaluated its own block of the test set: pool the per-image results.

    The figures' examples stay those of process 0 (a sample is enough there).
    """
    if jax.process_count() == 1:
      return
    from jax.experimental import multihost_utils

    def gather(values):
      values = np.asarray(values, np.float32)
      counts = multihost_utils.process_allgather(np.array([values.size], np.int32)).reshape(-1)
      padded = np.zeros(int(counts.max()), np.float32)
      padded[:values.size] = values
      rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), -1)
      return np.concatenate([rows[i, :c] for i, c in enumerate(counts)]).tolist()
    self.labels = [int(v) for v in gather(self.labels)]
    self.pred = [int(v) for v in gather(self.pred)]
    self.pred_t = [int(v) for v in gather(self.pred_t)]
    self.r, self.r_margin = gather(self.r), gather(self.r_margin)
    for k in self.ctr:
      self.ctr[k] = gather(self.ctr[k])
    for k in self.box:
      self.box[k] = gather(self.box[k])
    for k in self.band:
      self.band[k] = float(np.sum(multihost_utils.process_allgather(np.float32(self.band[k]))))

  def metrics(self) -> dict:
    y, p, pt = map(np.asarray, (self.labels, self.pred, self.pred_t))
    if y.size == 0:
      raise UserError("the test set is empty: nothing to evaluate")
    conf = lambda a: [[int(np.sum((y == i) & (a == j))) for j in range(NUM_CLASSES)]
                      for i in range(NUM_CLASSES)]
    m = {
        "num_test": int(y.size),
        "class_names": list(CLASS_NAMES),
        "accuracy_original": float(np.mean(p == y)),
        "accuracy_translated": float(np.mean(pt == y)),
        "confusion_original": conf(p),
        "confusion_translated": conf(pt),
        "flip_rate": {CLASS_NAMES[c]: float(np.mean(p[y == c] != pt[y == c])) if np.any(y == c) else None
                      for c in range(NUM_CLASSES)},
        "cam_attention_pearson": float(np.mean(self.r)),
        "cam_margin_attention_pearson": float(np.mean(self.r_margin)),
    }
    if self.band["area_all"] > 0:
      area = self.band["area_in"] / self.band["area_all"]
      m["border_band_area_share"] = float(area)
      m["attention_border_enrichment"] = float(self.band["att_in"] / max(self.band["att_all"], 1e-12) / area)
      m["cam_border_enrichment"] = float(self.band["cam_in"] / max(self.band["cam_all"], 1e-12) / area)
      m["cam_margin_border_enrichment"] = float(
          self.band["margin_in"] / max(self.band["margin_all"], 1e-12) / area)
    if self.ctr["real"]:
      real, fake, true = (np.asarray(self.ctr[k]) for k in ("real", "fake", "true"))
      # Into Cardiomegaly the heart must grow; into No Finding it must shrink.
      want_up = y == 0
      moved = np.where(want_up, fake > real, fake < real)
      m["ctr_direction_correct"] = float(np.mean(moved))
      m["ctr_shift"] = {d: float(np.mean(fake[y == 1 - i] - real[y == 1 - i])) if np.any(y == 1 - i) else None
                        for i, d in enumerate(DIRECTIONS)}
      m["ctr_crosses_threshold"] = float(np.mean(np.where(want_up, fake > 0.5, fake < 0.5)))
      if np.all(np.isfinite(true)):
        m["ctr_regressor_mae"] = float(np.mean(np.abs(real - true)))
    if self.box["att_share"]:
      m["num_boxed"] = len(self.box["att_share"])
      m["attention_in_box"] = float(np.mean(self.box["att_share"]))
      m["cam_in_box"] = float(np.mean(self.box["cam_share"]))
      m["attention_pointing"] = float(np.mean(self.box["att_point"]))
      m["cam_pointing"] = float(np.mean(self.box["cam_point"]))
    return m

  def arrays(self, size: int) -> dict:
    out = {}
    for d, ex in self.examples.items():
      for k, v in ex.items():
        if k == "id":
          out[f"{d}_id"] = np.asarray(v, dtype=str)
        elif v:
          out[f"{d}_{k}"] = np.asarray(v, np.float32)
        elif k in ("real", "attention", "generated", "fake"):
          out[f"{d}_{k}"] = np.zeros((0, size, size), np.float32)
    for t in range(NUM_CLASSES):
      for p in range(NUM_CLASSES):
        cell = self.cams.get((t, p), {"image": [], "cam": [], "prob": [], "id": []})
        name = f"cam_{CLASS_KEYS[t]}_as_{CLASS_KEYS[p]}"
        for k in ("image", "cam"):
          out[f"{name}_{k}"] = (np.asarray(cell[k], np.float32) if cell[k]
                                else np.zeros((0, size, size), np.float32))
        out[f"{name}_prob"] = np.asarray(cell["prob"], np.float32)
        out[f"{name}_id"] = np.asarray(cell["id"], dtype=str)
    return out


def evaluate(config, workdir: str, progress: bool = True) -> dict:
  """Runs the classifier, the AG-CycleGAN and (phantoms) the CTR regressor over the test set."""
  mesh = sh.data_mesh(jax.local_devices())
  size = config.data.image_size
  cls_params, cls_step = train.restore_params(workdir, "classifier", S.classifier_init_fn(config), mesh,
                                                config)
  cls_params = cls_params["classifier"]
  gan_params, gan_step = train.restore_params(workdir, "gan", S.gan_init_fn(config), mesh, config)
  phantoms = config.data.kind == "phantoms"
  ctr_params = ctr_model = None
  if phantoms:
    ctr_params, _ = train.restore_params(workdir, "ctr", S.ctr_init_fn(config), mesh, config)
    ctr_params = ctr_params["ctr"]
    ctr_model = S.ctr_model(config)
  fn = jax.jit(_eval_fn(S.classifier_model(config), S.gan_models(config.model), ctr_model, size))
  ddir = train.data_dir(config, workdir)
  train.check_image_size(config, ddir)
  source = pipeline.open_source(ddir, "test")
  n_local = len(jax.local_devices())
  batch_size = -(-config.eval.batch_size // n_local) * n_local
  acc = _Accumulator(size, config.eval.border_width, config.eval.num_figure_examples)
  seen = 0
  batches = pipeline.eval_batches(source, batch_size=batch_size, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())
  from tqdm import tqdm
  for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not (progress and train.is_main_process())):
    images = sh.to_global({"image": batch["image"], "label": batch["label"].astype(np.int32)}, mesh)
    out = jax.device_get(fn(cls_params, gan_params, ctr_params, images["image"], images["label"]))
    acc.add(batch, out)
    seen += int(np.sum(batch["valid"]))
    # (every process yields the same number of batches, so they stop together)
    if config.eval.max_examples and seen * jax.process_count() >= config.eval.max_examples:
      break
  acc.merge_processes()
  metrics = acc.metrics()
  metrics.update({
      "dataset": config.data.kind,
      "image_size": size,
      "classifier_step": cls_step,
      "gan_step": gan_step,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
      "config": json.loads(json.dumps(config.to_dict(), default=list)),
  })
  if train.is_main_process():
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    np.savez(os.path.join(workdir, "eval", "examples.npz"), **acc.arrays(size))
    tmp = os.path.join(workdir, "metrics.json.tmp")
    with open(tmp, "w") as f:
      json.dump(metrics, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "metrics.json"))
  return metrics
