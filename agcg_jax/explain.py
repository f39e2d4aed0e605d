"""`agcg explain --image FILE...`: explain chosen radiographs with a trained run.

Each PNG is converted like prepared data (grayscale, antialiased resize to
data.image_size), classified, translated into both classes and classified
again. The cases are `examples.ExampleMaps` (label -1: unknown; the decision
map of kind `eval.cam`, default "margin"), saved to
<workdir>/figures/explain_examples.npz and drawn as paper Fig. 4 rows (Real,
Attention, Masked, Fake, Diff) into <workdir>/figures/explain_<name>_<direction>.png;
the class probabilities go to <workdir>/figures/explain_predictions.json.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from agcg_jax import cam as cam_lib
from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import files
from agcg_jax import figures
from agcg_jax import state as S
from agcg_jax import workdir as wd
from agcg_jax.data.images import load_image
from agcg_jax.data.records import CLASS_KEYS, CLASS_NAMES, to_float
from agcg_jax.errors import UserError
from agcg_jax.examples import ExampleMaps
from agcg_jax.models.discriminator import trunk_geometry
from agcg_jax.steps import translate


def _load(paths, size: int) -> tuple[np.ndarray, list[str]]:
  """Images [N, S, S, 1] in [-1, 1] and their names; unreadable files are a UserError."""
  images, names = [], []
  for p in paths:
    if not os.path.isfile(p):
      raise UserError(f"--image {p}: no such file")
    try:
      u8, _, _ = load_image(p, size)
    except Exception as e:  # PIL raises several kinds for a bad file
      raise UserError(f"--image {p}: not a readable image ({type(e).__name__}: {e})") from e
    images.append(to_float(u8[..., None]))
    names.append(os.path.splitext(os.path.basename(p))[0])
  return np.stack(images), names


def explain_files(config, workdir: str, paths) -> list[str]:
  """Writes one figure per image and direction; returns their paths."""
  size = config.data.image_size
  kind = config.eval.get("cam", "margin")
  if kind not in cam_lib.CAM_KINDS:
    raise UserError(f"eval.cam={kind!r}: expected one of {', '.join(cam_lib.CAM_KINDS)}")
  x, names = _load(paths, size)
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
                 "pred_translated": jnp.argmax(cls_model.apply({"params": cp}, fake), -1)}
    return jax.nn.softmax(logits, -1), pred, maps, outs
  probs, pred, maps, outs = jax.device_get(run(cls_params["classifier"], gan_params, x))

  # Image-major: rows 2i, 2i + 1 are image i translated into each class.
  n = len(names)
  parts = []
  for k in CLASS_KEYS:
    o = outs[k]
    parts.append(ExampleMaps(
        id=names, direction=[f"to_{k}"] * n, label=np.full(n, -1), pred=pred,
        pred_translated=o["pred_translated"], prob=probs[np.arange(n), pred],
        real=x[..., 0], attention=o["attention"], generated=o["generated"], fake=o["fake"],
        cam=maps, ctr_real=np.full(n, np.nan), ctr_fake=np.full(n, np.nan), cam_kind=kind))
  order = np.arange(n * len(CLASS_KEYS)).reshape(len(CLASS_KEYS), n).T.ravel()
  examples = ExampleMaps.concatenate(parts).take(order)

  fig_dir = wd.figures_dir(workdir)
  os.makedirs(fig_dir, exist_ok=True)
  examples.save(os.path.join(fig_dir, "explain_examples.npz"))
  written = []
  per_image = len(CLASS_KEYS)
  for i, name in enumerate(names):
    one = examples.take(np.arange(i * per_image, (i + 1) * per_image))
    for k in CLASS_KEYS:
      d = f"to_{k}"
      path = os.path.join(fig_dir, f"explain_{name}_{d}.png")
      figures.figure_translation(one, d, path)
      written.append(path)
  files.write_json(os.path.join(fig_dir, "explain_predictions.json"),
                   {name: {CLASS_NAMES[c]: float(probs[i, c]) for c in range(len(CLASS_NAMES))}
                    for i, name in enumerate(names)})
  return written
