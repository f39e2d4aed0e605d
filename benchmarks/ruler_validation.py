"""Accuracy of the model-free CTR ruler (`agcg_jax.ruler`) on phantoms.

  .venv/bin/python benchmarks/ruler_validation.py [--size 64] [--n 400]
      [--split ruler_check] [--base-seed 0] [--sizes 32,64,128]

Results of 2026-11-28 (2-core CPU): see the `agcg_jax.ruler` docstring.

Renders n phantoms (`agcg_jax.data.phantoms`): n / 2 patients (seeds
`phantom_seed(base_seed, split, i)`), each with label 0 and label 1, so the
labels alternate and every patient is a counterfactual twin pair that
differs only in the heart. Measures every image with `silhouette_ctr`
(jitted, images in [-1, 1] as the pipeline feeds them) and prints one JSON
line per size:

* mae, bias, max_abs_err, share_err_over_0.05, pearson_r: ruler CTR
  against the phantom's true CTR; pearson_r_nf / pearson_r_cm: the same r
  within each label (the ruler must follow the CTR inside a class, not only
  split the classes);
* accuracy: share of images where (ruler CTR > 0.5) == label;
* twins_ordered: share of pairs where ruler(label 1) > ruler(label 0);
* baseline_mae: MAE of always predicting the mean true CTR (what the ruler
  must beat), and baseline_label_mae: of predicting each label's mean CTR
  (what a ruler that only knew the class would get);
* invalid: images the ruler could not measure (NaN; counted as errors in
  accuracy and twins, left out of mae and r);
* render_s, measure_s (after compilation).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from agcg_jax import ruler  # noqa: E402
from agcg_jax.data import phantoms  # noqa: E402
from agcg_jax.data.records import to_float  # noqa: E402


def render(n, size, split, base_seed):
  """n phantoms: pairs (label 0, label 1) of n // 2 patients."""
  images, ctr, label = [], [], []
  for i in range(n):
    p = phantoms.make_phantom(phantoms.phantom_seed(base_seed, split, i // 2),
                              size, i % 2)
    images.append(to_float(p["image"]))
    ctr.append(float(p["ctr"]))
    label.append(i % 2)
  return np.stack(images), np.array(ctr), np.array(label)


def evaluate(pred, true, label):
  """The metrics of one run, as a dict of plain floats."""
  ok = np.isfinite(pred)
  err = pred[ok] - true[ok]
  pairs = len(pred) // 2
  nf, cm = pred[0:2 * pairs:2], pred[1:2 * pairs:2]
  label_mean = np.where(label == 1, true[label == 1].mean(),
                        true[label == 0].mean())
  return {
      "mae": float(np.abs(err).mean()),
      "bias": float(err.mean()),
      "max_abs_err": float(np.abs(err).max()),
      "share_err_over_0.05": float(np.mean(np.abs(err) > 0.05)),
      "pearson_r": float(np.corrcoef(pred[ok], true[ok])[0, 1]),
      # Within each label: does the ruler track the CTR, not just the class?
      "pearson_r_nf": float(np.corrcoef(pred[ok & (label == 0)],
                                        true[ok & (label == 0)])[0, 1]),
      "pearson_r_cm": float(np.corrcoef(pred[ok & (label == 1)],
                                        true[ok & (label == 1)])[0, 1]),
      "accuracy": float(np.mean(ok & ((pred > 0.5) == (label == 1)))),
      "twins_ordered": float(np.mean(np.isfinite(nf) & np.isfinite(cm)
                                     & (cm > nf))),
      "baseline_mae": float(np.abs(true - true.mean()).mean()),
      "baseline_label_mae": float(np.abs(true - label_mean).mean()),
      "invalid": int((~ok).sum()),
  }


def run(size, n, split, base_seed):
  start = time.perf_counter()
  images, true, label = render(n, size, split, base_seed)
  render_s = time.perf_counter() - start
  measure = jax.jit(lambda x: ruler.silhouette_ctr(x)["ctr"])
  jax.block_until_ready(measure(images))  # Compile.
  start = time.perf_counter()
  pred = np.asarray(jax.block_until_ready(measure(images)))
  measure_s = time.perf_counter() - start
  out = {"benchmark": "ruler_validation", "size": size, "n": n,
         "split": split, "base_seed": base_seed}
  out.update({k: round(v, 4) if isinstance(v, float) else v
              for k, v in evaluate(pred, true, label).items()})
  out.update(render_s=round(render_s, 2), measure_s=round(measure_s, 3),
             backend=jax.default_backend())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--sizes", default=None,
                      help="comma-separated sizes; overrides --size")
  parser.add_argument("--n", type=int, default=400)
  parser.add_argument("--split", default="ruler_check")
  parser.add_argument("--base-seed", type=int, default=0)
  args = parser.parse_args()
  if args.n < 2 or args.n % 2:
    parser.error("--n must be even and >= 2 (twin pairs)")
  sizes = ([int(v) for v in args.sizes.split(",")] if args.sizes
           else [args.size])
  for size in sizes:
    print(json.dumps(run(size, args.n, args.split, args.base_seed)),
          flush=True)


if __name__ == "__main__":
  main()
