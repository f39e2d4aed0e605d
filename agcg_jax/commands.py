"""What each `agcg` subcommand does, as library functions callable from tests.

The argument parsing and the dispatch table live in cli.py; this is the only
layer that imports the training loop (train.py). Every function takes the
loaded config and the run directory and returns the process exit status.
"""
import errno
import json
import os
import sys
import time

from agcg_jax import evaluate as evaluate_lib
from agcg_jax import train
from agcg_jax import workdir as wd
from agcg_jax.distributed import is_main_process
from agcg_jax.errors import UserError
from agcg_jax.models import conv_rewrites, cpu_kernels

# A write the filesystem refused: disk full, quota, no permission, read-only.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
# What `agcg demo` prints at the end (those present in metrics.json).
_DEMO_KEYS = ("accuracy_original", "accuracy_translated", "flip_rate", "attention_truth_enrichment",
              "cam_truth_enrichment", "counterfactual_error", "ctr_direction_correct",
              "ctr_direction_correct_model_free", "attention_box_enrichment")


def guard_writes(name: str, workdir: str, fn, *args, **kwargs) -> int:
  """Runs `fn`; a write the filesystem refuses is one line (UserError), not a traceback.

  Training names the checkpoint it could not write and the last complete one
  (train.py); evaluate and explain write metrics.json and report.html through
  a temporary file (files.py), so the previous ones stay whole.
  """
  try:
    return fn(*args, **kwargs)
  except OSError as e:
    if e.errno not in _WRITE_ERRNOS:
      raise
    raise UserError(f"{name}: {e.strerror}: {e.filename or workdir}; the checkpoints and "
                    "earlier results are untouched: free space or fix the permissions, then run "
                    "the same command again") from None


# ------------------------------------------------------------------ prepare


def prepare(config, workdir: str) -> str:
  """Prepares the dataset the config describes (by `data.kind`) unless it is there, and the
  evaluation dataset (`eval_data`) when the config names one.

  Returns:
    The training dataset's version folder.
  """
  path = _prepare_data(config, workdir)
  scored = wd.eval_config(config)
  if scored is not config:
    print(f"agcg: evaluation dataset ready in {_prepare_data(scored, workdir)}", flush=True)
  return path


def _prepare_data(config, workdir: str) -> str:
  kind, root = config.data.kind, wd.data_root(config, workdir)
  if kind == "phantoms":
    from agcg_jax.data import tfds_phantoms  # pylint: disable=g-import-not-at-top
    tfds_phantoms.prepare_phantoms(root, size=config.data.image_size,
                                   num_train=config.data.num_train,
                                   num_test=config.data.num_test, seed=config.seed)
  elif kind == "nih":
    n = config.data.nih
    if not n.source:
      raise UserError("data.kind=nih: set --config.data.nih.source to the NIH download (the folder "
                      "with Data_Entry_2017*.csv beside images/)")
    prepare_nih(n.source, root, size=config.data.image_size, views=n.views, split=n.split,
                balance=n.balance, seed=n.seed, strict=n.strict, workers=n.workers or None,
                normalize=n.normalize, controls=n.controls)
  elif kind == "folders":
    from agcg_jax.data import tfds_folders  # pylint: disable=g-import-not-at-top
    f = config.data.folders
    if not f.source:
      raise UserError("data.kind=folders: set --config.data.folders.source to the root of the "
                      "class folders")
    class_map = {0: wd.split_names(f.no_finding), 1: wd.split_names(f.cardiomegaly)}
    tfds_folders.prepare_folders(f.source, root, size=config.data.image_size, seed=f.seed,
                                 test_fraction=f.test_fraction, class_map=class_map,
                                 ignore=wd.split_names(f.ignore), normalize=f.normalize,
                                 strict=f.strict, workers=f.workers or None)
  elif kind == "ctr_masks":
    from agcg_jax.data import tfds_outlines  # pylint: disable=g-import-not-at-top
    o = config.data.ctr_masks
    tfds_outlines.prepare_outlines(o.source, root, size=config.data.image_size, seed=o.seed,
                                   test_fraction=o.test_fraction, threshold=o.threshold,
                                   strict=o.strict, normalize=o.normalize)
  else:
    wd.dataset_name(config)  # raises the one-line error naming the kinds
  return wd.dataset_dir(config, workdir)


def prepare_nih(data_dir: str, out: str, **options) -> dict:
  """Prepares an NIH cohort and prints a short summary; `agcg prepare-nih` (flags) calls it too."""
  from agcg_jax.data import tfds_nih  # pylint: disable=g-import-not-at-top
  report = tfds_nih.prepare_nih(data_dir, out, **options)
  counts = report["counts"]["dataset"]
  print(f"nih_chest_xray14/{report['config']}: "
        + "; ".join(f"{s} " + ", ".join(f"{c} {n}" for c, n in counts[s].items())
                    for s in ("train", "test")))
  print(f"missing {report['missing']['count']}, unreadable {report['unreadable']['count']}, "
        f"converted now {report['cache']['converted_now']}, reused {report['cache']['reused']}")
  print(f"dataset: {report['tfds_dir']}")
  print(f"report:  {os.path.join(out, 'cohort.json')}")
  return report


# ------------------------------------------------------------- train, evaluate


def _report_stage(name: str, status: str, state) -> int:
  """A stop signal is a clean exit (status 0) after the checkpoint; say how to go on."""
  if status == "stopped" and is_main_process():
    print(f"agcg: {name} stopped by a signal at step {int(state.step)}; checkpoint saved. "
          "Run the same command to resume.", flush=True)
  return 0


def train_stage(name: str, config, workdir: str) -> int:
  state, status = train.train_stage(name, config, workdir)
  return _report_stage(name, status, state)


def evaluate(config, workdir: str) -> int:
  m = evaluate_lib.evaluate(config, workdir)
  if is_main_process():
    print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}))
  return 0


def explain(config, workdir: str, images=()) -> str:
  """report.html (and figures) of an evaluated run; with `images`, those radiographs too."""
  from agcg_jax import explain as explain_lib  # pylint: disable=g-import-not-at-top
  from agcg_jax import report  # pylint: disable=g-import-not-at-top
  path = report.write_report(workdir)
  if images:
    explain_lib.explain_files(config, workdir, images)
  return path


def demo(config, workdir: str) -> int:
  """prepare -> classifier -> CTR regressor (phantoms) -> AG-CycleGAN -> segmenter (outlined
  radiographs) -> evaluate -> report."""
  t0 = time.time()
  main = is_main_process()
  if main:
    print(f"agcg demo: {config.data.kind} data -> {wd.dataset_dir(config, workdir, False)}",
          flush=True)
  if conv_rewrites.resolve(config.model.conv_rewrites):
    cpu_kernels.prebuild()  # compiled (first run only) while the data are prepared
  prepare(config, workdir)
  stages = ("classifier", "ctr", "gan") if config.data.kind == "phantoms" else ("classifier", "gan")
  if wd.masks_config(config) is not None:
    stages += ("segmenter",)
  for name in stages:
    state, status = train.train_stage(name, config, workdir)
    if status == "stopped":
      return _report_stage(name, status, state)
  metrics = evaluate_lib.evaluate(config, workdir)
  path = explain(config, workdir)
  if main:
    print(json.dumps({k: round(metrics[k], 4) for k in _DEMO_KEYS
                      if isinstance(metrics.get(k), (int, float))}))
    print(f"agcg demo: done in {time.time() - t0:.0f} s; report: {path}", file=sys.stdout)
  return 0
