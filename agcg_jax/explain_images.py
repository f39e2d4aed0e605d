"""`agcg explain --image FILE...`: explain chosen radiographs with a trained run.

Each PNG is converted like prepared data (grayscale, antialiased resize to
data.image_size), classified, translated into both classes, and drawn as
paper Fig. 4 rows (Real, Attention, Masked, Fake, Diff) plus the classifier's
prediction, into <workdir>/figures/explain_<name>.png.
"""
import json
import os

import jax
import numpy as np

from agcg_jax import cam as cam_lib
from agcg_jax import report
from agcg_jax import state as S
from agcg_jax import train
from agcg_jax.data.nih import load_image
from agcg_jax.data.records import CLASS_KEYS, CLASS_NAMES, to_float
from agcg_jax.errors import UserError
from agcg_jax.steps import translate


def explain_files(config, workdir: str, paths) -> list[str]:
  """Writes one figure per image; returns their paths. Unreadable files are a UserError."""
  size = config.data.image_size
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
  x = np.stack(images)
  cls_params, _ = train.restore_params(workdir, "classifier", S.classifier_init_fn(config),
                                      config=config)
  gan_params, _ = train.restore_params(workdir, "gan", S.gan_init_fn(config), config=config)
  cls_model, gan_models = S.classifier_model(config), S.gan_models(config.model)

  @jax.jit
  def run(cp, gp, batch):
    logits, _ = cam_lib.logits_and_cam(cls_model, cp, batch)
    return jax.nn.softmax(logits, -1), {k: translate(gan_models, gp, k, batch) for k in CLASS_KEYS}
  probs, outs = jax.device_get(run(cls_params["classifier"], gan_params, x))
  fig_dir = os.path.join(workdir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  written = []
  for i, name in enumerate(names):
    pred = int(np.argmax(probs[i]))
    for k in CLASS_KEYS:
      fake, att, gen = (np.asarray(a[i:i + 1, ..., 0]) for a in outs[k])
      d = f"to_{k}"
      examples = {f"{d}_real": x[i:i + 1, ..., 0], f"{d}_attention": att, f"{d}_generated": gen,
                  f"{d}_fake": fake,
                  f"{d}_id": np.asarray([f"{name}: {CLASS_NAMES[pred]} ({probs[i, pred]:.2f})"])}
      path = os.path.join(fig_dir, f"explain_{name}_{d}.png")
      report.figure_translation(examples, d, path)
      written.append(path)
  with open(os.path.join(fig_dir, "explain_predictions.json"), "w") as f:
    json.dump({n: {CLASS_NAMES[c]: float(probs[i, c]) for c in range(len(CLASS_NAMES))}
               for i, n in enumerate(names)}, f, indent=2)
  return written
