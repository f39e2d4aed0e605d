"""How well the heart/lung segmenter reads the CTR of real radiographs.

  .venv/bin/python benchmarks/segmenter_validation.py [--size 64] \
      [--root ../shared/ctr_wingspan] [--steps 1000] [--batch 16] \
      [--width 8] [--depth 4] [--patch S/64] [--no-augment] [--lr 3e-3] \
      [--seed 0]

Prepares the outlined set (`tfds_outlines.prepare_outlines`, a temporary
folder unless --data-dir; 194 train / 65 test, stratified by CTR > 0.5),
trains `models.segmenter.Segmenter` on the train split for --steps steps
(`segment.segmenter_train_step`, jitted, state donated), then reads the CTR
of every held-out test image with `segment.ctr_of` and prints one JSON line:

* mae, bias, max_abs_err, pearson_r: predicted against the drawn CTR (the
  full-resolution masks'); invalid: test images with no heart or lung
  column (left out of mae and r);
* accuracy: share of test images where (predicted CTR > threshold) ==
  label;
* dice_heart, dice_lung: hard dice (probability > 0.5) on the test split;
* ceiling_mae: `ctr_of` on the stored true masks at this size (what a
  perfect segmenter would get: the resolution's own error);
* baseline_mae: always the training split's mean CTR; baseline_label_mae:
  each test image's class mean from training (knowing the label);
* train_s (after compilation), compile_s, step_ms, eval_s, prepare_s.

Results of 2026-11-28, 2-core CPU shared with other jobs (load 2-10, so
step times vary by ~30%), seed 0, batch 16, width 8, depth 4; test split of
65 (ceiling 0.0089 at 64 px, 0.0042 at 128; baselines: training mean 0.0552,
class mean 0.0381):

  size patch augment steps lr    train_s  mae    bias    r     acc   dice h/l
  64   1     no      700   2e-3  256     0.0231 +0.005  0.903 0.892 .919/.938
  64   1     no      700   2e-3  219     0.0272 +0.012  0.871 0.923 .922/.943 (*)
  64   1     yes     700   2e-3  244     0.0253 +0.019  0.926 0.985 .927/.952
  64   1     yes     1000  3e-3  268     0.0241 +0.017  0.927 0.985 .925/.953
  128  2     no      700   2e-3  183     0.0291 +0.025  0.924 0.954 .917/.939
  128  2     yes     700   2e-3  194     0.0302 +0.027  0.918 0.969 .923/.946
  128  2     no      1050  3e-3  315     0.0240 +0.012  0.894 0.969 .922/.942
  128  2     yes     1000  3e-3  300     0.0195 +0.012  0.933 0.969 .927/.953

(*) the same settings as the row above it, with the initialisation key the
script now uses (the first run used key(seed) itself): the spread between
two initialisations is ~0.004 in MAE. The default command (1000 steps at
3e-3 with augmentation) is the last row at --size 128 and the one above
the 128 rows at --size 64. Every run meets MAE <= 0.03 except 128 px at 700
steps, which had not converged (train loss 0.32-0.36 against 0.04-0.10).
What is left is mostly bias: the heart is read ~1 px too wide at 64 px
(its lower corners, where heart meets diaphragm, leak), while the thorax
is right to ~0.2 px; the model overfits 194 images (train CTR MAE ~0.01).
"""
import argparse
import functools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from agcg_jax import segment  # noqa: E402
from agcg_jax.data import pipeline  # noqa: E402
from agcg_jax.data import tfds_outlines  # noqa: E402

FIELDS = ("heart_mask", "lung_mask", "ctr")


def read_split(source) -> dict[str, np.ndarray]:
  """Every record of a split, batched by field (id left out)."""
  batches = list(pipeline.eval_batches(source, batch_size=32))
  out = {k: np.concatenate([b[k] for b in batches])
         for k in ("image", "label", "ctr", "heart_mask", "lung_mask",
                   "valid")}
  keep = out.pop("valid")
  return {k: v[keep] for k, v in out.items()}


def train(source, args):
  """Trains the segmenter; returns (params, seconds, compile seconds, last metrics)."""
  model = segment.segmenter_model(args.width, args.depth, args.patch)
  init = segment.segmenter_init_fn(args.width, args.size, args.lr, args.steps,
                                   depth=args.depth, patch=args.patch)
  init_key, augment_key = jax.random.split(jax.random.key(args.seed))
  state = jax.jit(init)(init_key)
  step = jax.jit(functools.partial(
      segment.segmenter_train_step, model=model,
      augment_key=augment_key if args.augment else None), donate_argnums=0)
  batches = pipeline.classifier_batches(source, batch_size=args.batch,
                                        seed=args.seed, fields=FIELDS)
  start = time.perf_counter()
  state, metrics = step(state, next(batches))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(1, args.steps):
    state, metrics = step(state, next(batches))
    if i % args.log_every == 0 or i == args.steps - 1:
      m = {k: round(float(v), 4) for k, v in metrics.items()}
      print(f"step {i}: {m} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr)
  jax.block_until_ready(state)
  return state.params, time.perf_counter() - start, compile_s, metrics


def predict(params, test, args):
  model = segment.segmenter_model(args.width, args.depth, args.patch)
  fn = jax.jit(functools.partial(segment.segmenter_predict, model=model))
  out = {"ctr": [], "valid": [], "hard": []}
  for lo in range(0, len(test["image"]), 32):
    p = fn(params, test["image"][lo:lo + 32])
    out["ctr"].append(np.asarray(p["ctr"]))
    out["valid"].append(np.asarray(p["valid"]))
    out["hard"].append(np.asarray(p["probs"]) > 0.5)
  return {k: np.concatenate(v) for k, v in out.items()}


def dice(hard, truth):
  inter = np.sum(hard & truth, axis=(1, 2))
  return float(np.mean(2 * inter / np.maximum(
      hard.sum(axis=(1, 2)) + truth.sum(axis=(1, 2)), 1)))


def scores(pred, test, train_split, threshold):
  """The metrics of one run, as a dict of plain floats."""
  true, label = test["ctr"].astype(np.float64), test["label"]
  ok = pred["valid"]
  err = pred["ctr"][ok] - true[ok]
  truth = np.concatenate([test["heart_mask"], test["lung_mask"]], -1) > 0
  ceiling, _ = segment.ctr_of(truth.astype(np.float32), from_logits=False)
  train_ctr, train_label = train_split["ctr"], train_split["label"]
  class_mean = np.array([train_ctr[train_label == c].mean() for c in (0, 1)])
  return {
      "n_train": int(len(train_ctr)), "n_test": int(len(true)),
      "mae": float(np.abs(err).mean()),
      "bias": float(err.mean()),
      "max_abs_err": float(np.abs(err).max()),
      "pearson_r": float(np.corrcoef(pred["ctr"][ok], true[ok])[0, 1]),
      "invalid": int(np.sum(~ok)),
      "accuracy": float(np.mean(ok & ((pred["ctr"] > threshold)
                                      == (label == 1)))),
      "dice_heart": dice(pred["hard"][..., 0], truth[..., 0]),
      "dice_lung": dice(pred["hard"][..., 1], truth[..., 1]),
      "ceiling_mae": float(np.abs(np.asarray(ceiling) - true).mean()),
      "baseline_mae": float(np.abs(true - train_ctr.mean()).mean()),
      "baseline_label_mae": float(np.abs(true - class_mean[label]).mean()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=os.path.join(
      ROOT, "..", "shared", "ctr_wingspan"))
  parser.add_argument("--data-dir", default=None,
                      help="where to prepare the dataset (default: a "
                      "temporary folder)")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--patch", type=int, default=None,
                      help="space-to-depth factor of the input (default "
                      "size / 64: the net runs at 64 px; 2 at 128 px costs "
                      "what 1 at 64 px does)")
  parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="random exposure, zoom and shift (segment.augment)")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--log-every", type=int, default=100)
  args = parser.parse_args()
  if args.patch is None:
    args.patch = max(1, args.size // 64)

  with tempfile.TemporaryDirectory(prefix="outlines-") as tmp:
    start = time.perf_counter()
    data_dir = args.data_dir or tmp
    tfds_outlines.prepare_outlines(args.root, data_dir, size=args.size,
                                   seed=args.seed, threshold=args.threshold)
    prepare_s = time.perf_counter() - start
    train_source = pipeline.open_source(data_dir, "train")
    train_split = read_split(train_source)
    test = read_split(pipeline.open_source(data_dir, "test"))
    params, train_s, compile_s, last = train(train_source, args)
    start = time.perf_counter()
    pred = predict(params, test, args)
    eval_s = time.perf_counter() - start
  result = {
      "size": args.size, "steps": args.steps, "batch": args.batch,
      "width": args.width, "depth": args.depth, "patch": args.patch,
      "augment": args.augment, "lr": args.lr,
      "seed": args.seed,
      **scores(pred, test, train_split, args.threshold),
      "final_train_loss": float(last["loss"]),
      "train_s": round(train_s, 1), "compile_s": round(compile_s, 1),
      "step_ms": round(1000 * train_s / max(args.steps - 1, 1), 1),
      "eval_s": round(eval_s, 1), "prepare_s": round(prepare_s, 1),
  }
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                    for k, v in result.items()}))


if __name__ == "__main__":
  main()
