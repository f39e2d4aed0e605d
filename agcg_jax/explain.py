"""`agcg explain --image FILE|DIR ...`: explain any radiograph with a trained run.

Each file (PNG, JPEG, 8- or 16-bit, DICOM; a folder is searched for them) is
converted like prepared data (data/images.load_image: grayscale, antialiased
resize to data.image_size), classified, translated into both classes and
classified again, in batches of `eval.batch_size`. Per image, under
<workdir>/explained/<name>/:

  figure_to_<class>.png       paper Fig. 4 row: Real | Attention | Masked | Fake | Diff
  attention_to_<class>.npy    float32 [S, S] in [0, 1], and a grey PNG
  difference_to_<class>.npy   float32 [S, S], fake - real in [-2, 2], and a PNG (mid-grey = 0)
  cam.npy                     the decision map of kind `eval.cam` on the image grid, and a PNG

and one row per image in <workdir>/explained/predictions.csv and .json: the
class probabilities of the image and of each translation. The cases are also
saved as `examples.ExampleMaps` (label -1: unknown) in explained/examples.npz
(the first KEEP_EXAMPLES images, so a folder of thousands stays in memory).
"""
import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from agcg_jax import cam as cam_lib
from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import files
from agcg_jax import figures
from agcg_jax import progress
from agcg_jax import state as S
from agcg_jax import workdir as wd
from agcg_jax.data import images as images_lib
from agcg_jax.data.dicom import DICOM_SUFFIXES
from agcg_jax.data.records import CLASS_KEYS, CLASS_NAMES, to_float
from agcg_jax.errors import UserError
from agcg_jax.examples import ExampleMaps
from agcg_jax.models.discriminator import trunk_geometry
from agcg_jax.steps import translate

# The first images whose maps are also kept together in explained/examples.npz (for notebooks).
KEEP_EXAMPLES = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") + DICOM_SUFFIXES


def find_images(paths) -> list[str]:
  """Files named, and the image files (by suffix) under folders named, in a stable order."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(os.path.join(d, n) for d, _, names in os.walk(p) for n in names
                     if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
      if not found:
        raise UserError(f"--image {p}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
      out += found
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise UserError(f"--image {p}: no such file or folder")
  return out


def _names(paths) -> list[str]:
  """Output names: the file stems, made unique with a counter where two files share one."""
  seen, out = {}, []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    seen[stem] = seen.get(stem, 0) + 1
    out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
  return out


def _load(path: str, size: int) -> np.ndarray:
  """[S, S, 1] in [-1, 1]; an unreadable file is a UserError naming it."""
  try:
    u8, _, _ = images_lib.load_image(path, size)
  except UserError as e:
    raise UserError(f"--image {path}: {e}") from None
  except Exception as e:  # PIL raises several kinds for a bad file
    raise UserError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None
  return to_float(u8[..., None])


def _save_map(path_stem: str, values: np.ndarray, lo: float, hi: float) -> None:
  np.save(path_stem + ".npy", values.astype(np.float32))
  grey = np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
  Image.fromarray(grey).save(path_stem + ".png")


def explain_files(config, workdir: str, paths) -> list[str]:
  """Explains every image in `paths` (files or folders); returns the per-image output folders."""
  size = config.data.image_size
  kind = config.eval.get("cam", "margin")
  if kind not in cam_lib.CAM_KINDS:
    raise UserError(f"eval.cam={kind!r}: expected one of {', '.join(cam_lib.CAM_KINDS)}")
  paths = find_images(paths)
  names = _names(paths)
  cls_params, _ = ckpt_lib.restore_params(workdir, "classifier", S.classifier_init_fn(config),
                                         config=config)
  gan_params, _ = ckpt_lib.restore_params(workdir, "gan", S.gan_init_fn(config), config=config)
  cls_model, gan_models = S.classifier_model(config), S.gan_models(config.model)
  geometry = trunk_geometry(config.model.cls_layers)

  @jax.jit
  def run(cp, gp, batch):
    logits, cams = cam_lib.logits_and_cam(cls_model, cp, batch)
    pred = jnp.argmax(logits, -1)
    maps = cam_lib.upsample(cam_lib.decision_maps(cams, pred)[kind], size, *geometry)
    outs = {}
    for k in CLASS_KEYS:
      fake, att, gen = translate(gan_models, gp, k, batch)
      outs[k] = {"fake": fake[..., 0], "attention": att[..., 0], "generated": gen[..., 0],
                 "probs": jax.nn.softmax(cls_model.apply({"params": cp}, fake), -1)}
    return jax.nn.softmax(logits, -1), pred, maps, outs

  out_dir = wd.explained_dir(workdir)
  batch_size = max(1, int(config.eval.batch_size))
  rows, parts, written = [], [], []
  starts = range(0, len(paths), batch_size)
  for start in progress.bar(starts, desc="explain", unit="batch",
                            total=len(starts), disable=len(starts) < 2):
    chunk = paths[start:start + batch_size]
    x = np.stack([_load(p, size) for p in chunk])
    n = len(chunk)
    if n < batch_size:  # one compiled shape: pad the last batch
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])
    probs, pred, maps, outs = jax.device_get(run(cls_params["classifier"], gan_params, x))
    for i in range(n):
      name, folder = names[start + i], os.path.join(out_dir, names[start + i])
      os.makedirs(folder, exist_ok=True)
      _save_map(os.path.join(folder, "cam"), maps[i], -np.abs(maps[i]).max() - 1e-6,
                np.abs(maps[i]).max() + 1e-6)
      row = {"name": name, "file": os.path.abspath(chunk[i]),
             "predicted": CLASS_NAMES[int(pred[i])]}
      row.update({f"p_{k}": float(probs[i, c]) for c, k in enumerate(CLASS_KEYS)})
      for k in CLASS_KEYS:
        o = outs[k]
        _save_map(os.path.join(folder, f"attention_to_{k}"), o["attention"][i], 0.0, 1.0)
        _save_map(os.path.join(folder, f"difference_to_{k}"), o["fake"][i] - x[i, ..., 0],
                  -1.0, 1.0)
        row.update({f"to_{k}_p_{c}": float(o["probs"][i, j]) for j, c in enumerate(CLASS_KEYS)})
      rows.append(row)
      written.append(folder)
    for k in CLASS_KEYS:
      o = outs[k]
      part = ExampleMaps(
          id=names[start:start + n], direction=[f"to_{k}"] * n, label=np.full(n, -1),
          pred=pred[:n], pred_translated=np.argmax(o["probs"][:n], -1),
          prob=probs[np.arange(n), pred[:n]], real=x[:n, ..., 0], attention=o["attention"][:n],
          generated=o["generated"][:n], fake=o["fake"][:n], cam=maps[:n],
          ctr_real=np.full(n, np.nan), ctr_fake=np.full(n, np.nan), cam_kind=kind)
      for i in range(n):
        figures.figure_translation(part.take(np.array([i])), f"to_{k}",
                                   os.path.join(out_dir, names[start + i], f"figure_to_{k}.png"))
      if start < KEEP_EXAMPLES:
        parts.append(part)
  ExampleMaps.concatenate(parts).save(os.path.join(out_dir, "examples.npz"))
  files.write_json(os.path.join(out_dir, "predictions.json"), rows)
  with files.atomic_path(os.path.join(out_dir, "predictions.csv")) as tmp:
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return written
