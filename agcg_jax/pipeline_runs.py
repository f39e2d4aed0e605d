"""The run subcommands as library functions: what `agcg COMMAND` does, callable from tests."""
import errno
import json
import os
import time


from agcg_jax import evaluate as evaluate_lib
from agcg_jax import train
from agcg_jax.errors import UserError


def prepare_phantoms(config, workdir: str) -> str:
  if config.data.kind != "phantoms":
    raise UserError(f"prepare-phantoms: data.kind is {config.data.kind!r}; use `agcg prepare-nih` "
                    "for NIH data or --config.data.kind=phantoms")
  from agcg_jax.data import tfds_phantoms
  return tfds_phantoms.prepare_phantoms(
      train.data_dir(config, workdir), size=config.data.image_size,
      num_train=config.data.num_train, num_test=config.data.num_test, seed=config.seed)


def _report_stage(name: str, status: str, state) -> int:
  """A stop signal is a clean exit (status 0) after the checkpoint; say how to go on."""
  if status == "stopped" and train.is_main_process():
    print(f"agcg: {name} stopped by a signal at step {int(state.step)}; checkpoint saved. "
          "Run the same command to resume.", flush=True)
  return 0


def explain(config, workdir: str, images=()) -> str:
  from agcg_jax import report
  path = report.write_report(workdir)
  if images:
    from agcg_jax import explain_images
    explain_images.explain_files(config, workdir, images)
  return path


def demo(config, workdir: str) -> int:
  """prepare -> classifier -> CTR regressor -> AG-CycleGAN -> evaluate -> report."""
  t0 = time.time()
  main = train.is_main_process()
  if main:
    print(f"agcg demo: phantom data -> {train.data_dir(config, workdir)}", flush=True)
  prepare_phantoms(config, workdir)
  for name, fn in (("classifier", train.train_classifier), ("ctr", train.train_ctr),
                   ("gan", train.train_gan)):
    state, status = fn(config, workdir)
    if status == "stopped":
      return _report_stage(name, status, state)
  metrics = evaluate_lib.evaluate(config, workdir)
  path = explain(config, workdir)
  if main:
    keys = ("accuracy_original", "accuracy_translated", "attention_border_enrichment",
            "cam_border_enrichment", "cam_attention_pearson", "ctr_direction_correct",
            "ctr_regressor_mae")
    print(json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}))
    print(f"agcg demo: done in {time.time() - t0:.0f} s; report: {path}")
  return 0


# A write the filesystem refused: disk full, quota, no permission, read-only.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def run_command(command: str, config, workdir: str, images=()) -> int:
  """Runs `agcg COMMAND`; a write the filesystem refuses is one line (UserError), not a traceback.

  Training names the checkpoint it could not write and the last complete one
  (train.py); evaluate and explain write metrics.json and report.html through
  a temporary file, so the previous ones stay whole.
  """
  try:
    return _run_command(command, config, workdir, images)
  except OSError as e:
    if e.errno not in _WRITE_ERRNOS:
      raise
    raise UserError(f"{command}: {e.strerror}: {e.filename or workdir}; the checkpoints and "
                    "earlier results are untouched: free space or fix the permissions, then run "
                    "the same command again") from None


def _run_command(command: str, config, workdir: str, images=()) -> int:
  os.makedirs(workdir, exist_ok=True)
  if command == "prepare-phantoms":
    path = prepare_phantoms(config, workdir)
    print(f"agcg: phantom dataset ready in {path}")
    return 0
  if command in ("train-classifier", "train-ctr", "train-gan"):
    name = command.split("-", 1)[1]
    fn = {"classifier": train.train_classifier, "ctr": train.train_ctr, "gan": train.train_gan}[name]
    state, status = fn(config, workdir)
    return _report_stage(name, status, state)
  if command == "evaluate":
    m = evaluate_lib.evaluate(config, workdir)
    if train.is_main_process():
      print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}))
    return 0
  if command == "explain":
    print(f"agcg: report written to {explain(config, workdir, images)}")
    return 0
  if command == "demo":
    return demo(config, workdir)
  raise UserError(f"unknown command {command!r}")
