"""Training loops: set up, restore, loop, log, checkpoint. Pure steps live in steps.py.

Each stage (classifier, gan, ctr) lives in <workdir>/<stage>/ with
checkpoints/, metrics.jsonl (one JSON object per logged step) and
config.json (the config sections it was trained with). Running the same
command again resumes from the last complete checkpoint, data order included.

Training longer: the same command with a larger `<stage>.steps` continues
the run from its last checkpoint to the new total, and config.json records
the new total (`RESUMABLE_FIELDS`: also the logging/checkpoint intervals;
anything that changes the networks or the data is still refused). The
learning-rate schedules (state.adam: constant, then linear decay to 0 from
`decay_start` x steps) and the GAN's optional second stage are functions of
the *absolute* step (the optimiser's own count, restored with the state) and
of the current total: raising `steps` re-plans the rest of the run as the
plan for the new total has it from that step on (the rule of CycleGAN's
--continue_train with a larger --n_epochs). Extended before its decay began,
a run is exactly the run planned for the new total from the start (tested);
extended after, it resumes at the new plan's rate for its step, e.g. a
finished 2000-step GAN (decay_start 0.5) raised to 2100 steps goes on at
(1 - 950/1050) = 0.095 of the base rates, down to 0 at 2100.

Faults: a damaged newest checkpoint is reported, moved aside and replaced by
the newest readable one (checkpoint.py); a write that fails (checkpoint,
metrics.jsonl, config.json) stops with one line naming the path and the last
complete checkpoint.
"""
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from agcg_jax import config as config_lib
from agcg_jax import progress as progress_lib
from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import steps
from agcg_jax import checkpoint as ckpt_lib
from agcg_jax.checkpoint import Checkpointer, abstract_with_shardings
from agcg_jax.data import pipeline
from agcg_jax.data.records import NUM_CLASSES
from agcg_jax.errors import UserError

# Config sections that define each stage's training; a workdir trained with
# other values for these refuses to resume.
STAGE_SECTIONS = {
    "classifier": ("seed", "data", "classifier"),
    "gan": ("seed", "data", "gan"),
    "ctr": ("seed", "data", "ctr"),
}
MODEL_FIELDS = {
    "classifier": ("dtype", "cls_width", "cls_layers"),
    "gan": ("dtype", "padding", "gen_width", "gen_down", "gen_res", "gen_upsample",
            "att_width", "att_dilations", "dis_width", "dis_layers", "dis_sigmoid"),
    "ctr": ("dtype",),  # its widths live in config.ctr (recorded with that section)
}
# Fields of a stage's own section that may differ from its record: they change
# how long the run is, or how often it logs and saves, never what it learns
# up to the steps already trained. `steps` may only grow.
RESUMABLE_FIELDS = ("steps", "log_every", "ckpt_every", "keep")


class NonFiniteLoss(UserError):
  """Training produced a non-finite loss or gradient norm."""


def is_main_process() -> bool:
  return jax.process_index() == 0


def data_dir(config, workdir: str) -> str:
  return config.data.dir or os.path.join(workdir, "data")


def _may_change(stage: str):
  def allowed(key, recorded, current) -> bool:
    section, _, field = key.partition(".")
    if section != stage or field not in RESUMABLE_FIELDS:
      return False
    if field == "steps":
      return isinstance(recorded, int) and isinstance(current, int) and current > recorded
    return True
  return allowed


def _record_stage_config(config, workdir: str, stage: str) -> None:
  """Records the stage's config in <workdir>/<stage>/config.json, or checks the run's record.

  A larger `<stage>.steps` (or other RESUMABLE_FIELDS) updates the record:
  the run is continued to the new total (module docstring).
  """
  sections = dict(config_lib.section_dict(config, STAGE_SECTIONS[stage]))
  sections["model"] = {k: config.model[k] for k in MODEL_FIELDS[stage]}
  path = os.path.join(workdir, stage, "config.json")
  cfg = ml_collections.ConfigDict(sections)
  if not is_main_process():
    return
  try:
    changed = config_lib.check_or_record(cfg, list(sections), path, may_change=_may_change(stage))
  except OSError as e:
    last = ckpt_lib.last_step_on_disk(os.path.join(workdir, stage, "checkpoints"))
    raise ckpt_lib.WriteError(ckpt_lib.write_failure(
        e.filename or path, e, os.path.join(workdir, stage, "checkpoints"), last)) from None
  if changed:
    print(f"agcg: {stage}: the run's config.json updated ({'; '.join(changed)})", flush=True)


class MetricsLog:
  """Appends one JSON line per logged step (process 0 only).

  On resume, lines logged after the restored checkpoint are dropped: those
  steps are trained again, and the file must read as one continuous run.
  """

  def __init__(self, path: str, resume_step: int, enabled: bool):
    self.path, self.enabled = path, enabled
    if not enabled:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kept, changed = [], False
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            changed = True
            continue  # a line cut short by a kill
          if row.get("step", 0) <= resume_step:
            changed |= not line.endswith("\n")
            kept.append(line if line.endswith("\n") else line + "\n")
          else:
            changed = True
      if not changed:
        return  # nothing to drop: no write (a finished run's workdir may be read-only)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)

  def write(self, row: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")


class StopSignal:
  """Turns SIGTERM (preemption, a scheduler) and a first Ctrl-C into a flag checked between steps.

  The loop then saves a checkpoint and returns; a second Ctrl-C interrupts at once.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler, no graceful stop
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


@dataclasses.dataclass
class Stage:
  """What a training stage needs besides the loop itself."""
  name: str
  init_fn: Callable[[jax.Array], S.TrainState]
  step_fn: Callable[[S.TrainState, Any], tuple[S.TrainState, dict]]
  make_batches: Callable[[int, int, int], Iterator[dict]]  # (batch per process, shard index, count)
  global_batch: int
  total_steps: int
  log_every: int
  ckpt_every: int
  keep: int
  seed: int


def _check_finite(metrics: dict, step: int, stage: str) -> None:
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise NonFiniteLoss(f"{stage}: non-finite {', '.join(sorted(bad))} at step {step}; "
                        "training stopped (the last checkpoint is kept): lower the learning rates "
                        "or use model.dtype=float32")


def run_stage(stage: Stage, workdir: str, mesh=None, progress: bool = True) -> tuple[S.TrainState, str]:
  """Trains `stage` to total_steps, resuming from <workdir>/<name>/checkpoints.

  Returns (state, status) with status 'done' or 'stopped' (SIGTERM: a
  checkpoint was saved first).
  """
  mesh = mesh or sh.data_mesh()
  stage_dir = os.path.join(workdir, stage.name)
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), stage.keep)
  replicated = sh.replicated(mesh)
  key = jax.random.PRNGKey(stage.seed)
  # Shape-first: the state's structure without computing it, then a jitted
  # init that materialises it directly with the replicated sharding.
  abstract = jax.eval_shape(stage.init_fn, key)
  shardings = jax.tree.map(lambda _: replicated, abstract)

  n_proc = jax.process_count()
  per_process = stage.global_batch // n_proc
  batches = stage.make_batches(per_process, jax.process_index(), n_proc)
  metrics_path = os.path.join(stage_dir, "metrics.jsonl")

  def write_failed(e: OSError) -> UserError:
    return ckpt_lib.WriteError(ckpt_lib.write_failure(
        e.filename or metrics_path, e, ckpt.directory, ckpt.last_complete_step()))

  try:
    restored = ckpt.restore_newest(abstract_with_shardings(abstract, replicated))
    if restored is not None:
      state, data_state, start = restored
      if data_state is not None:
        batches.set_state(data_state)
      start = int(start)
      if is_main_process():
        print(f"agcg: {stage.name}: resuming from step {start} of {stage.total_steps} "
              f"({ckpt.directory})", flush=True)
    else:
      state = jax.jit(stage.init_fn, out_shardings=shardings)(key)
      start = 0
    log = MetricsLog(metrics_path, start, is_main_process())
  except ckpt_lib.NetworksMismatch as e:
    ckpt.close()
    raise _mismatch(stage.name, ckpt.directory, e) from None
  except OSError as e:
    ckpt.close()
    raise write_failed(e) from None
  except BaseException:
    ckpt.close()
    raise
  jstep = jax.jit(stage.step_fn, donate_argnums=0, out_shardings=(shardings, replicated))

  status = "done"
  bar = progress_lib.bar(total=stage.total_steps, initial=start, desc=stage.name, unit="step",
                         disable=not (progress and is_main_process()))
  t_last, n_last = time.perf_counter(), start
  sync_every = max(1, min(stage.log_every, 10))
  try:
    with StopSignal() as stop:
      step = start
      while step < stage.total_steps:
        batch = sh.to_global(next(batches), mesh)
        state, metrics = jstep(state, batch)
        step += 1
        bar.update(1)
        last = step == stage.total_steps
        if step % stage.log_every == 0 or last:
          host = jax.device_get(metrics)
          _check_finite(host, step, stage.name)
          now = time.perf_counter()
          row = {"step": step, **{k: float(v) for k, v in sorted(host.items())},
                 "images_per_s": stage.global_batch * (step - n_last) / max(now - t_last, 1e-9)}
          t_last, n_last = now, step
          try:
            log.write(row)
          except OSError as e:
            raise write_failed(e) from None
          bar.set_postfix({k: f"{row[k]:.3g}" for k in list(row)[1:4]}, refresh=False)
        stopping = stop.requested
        if jax.process_count() > 1:
          # Every process must take the same decision at the same step, or the
          # collective save hangs: all of them compare flags every few steps.
          stopping = False
          if step % sync_every == 0 or last:
            stopping = bool(multihost_utils.process_allgather(np.array(stop.requested)).any())
        if step % stage.ckpt_every == 0 or last or stopping:
          ckpt.save(step, state, batches.get_state())
        if stopping:
          status = "stopped"
          break
  finally:
    # Also on an error or a hard interrupt: finish the saves in flight, so
    # the last checkpoint is complete.
    bar.close()
    ckpt.close()
  return state, status


def _check_trained_networks(config, workdir: str, stage: str) -> None:
  """The networks in a workdir must be those the config describes, or restoring fails deep in Orbax."""
  path = os.path.join(workdir, stage, "config.json")
  if config is None or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      recorded = json.load(f).get("model", {})
  except (OSError, json.JSONDecodeError):
    return
  current = json.loads(json.dumps({k: config.model[k] for k in MODEL_FIELDS[stage]}, default=list))
  diffs = [f"model.{k}={recorded[k]!r} there, {current[k]!r} here"
           for k in current if k in recorded and recorded[k] != current[k]]
  if diffs:
    raise UserError(f"the {stage} in {os.path.join(workdir, stage)} was trained with other networks "
                    f"({'; '.join(diffs)}): use the config it was trained with")


def _mismatch(stage: str, directory: str, detail) -> UserError:
  return UserError(f"the {stage} checkpoint in {directory} does not match the config's networks "
                   f"({detail}): use the config it was trained with")


def restore_params(workdir: str, stage: str, init_fn, mesh=None, config=None) -> tuple[dict, int]:
  """The params of a stage's newest readable checkpoint, or a UserError saying to train it first.

  With `config`, the networks recorded in the stage's config.json are checked
  against it first. A damaged newer checkpoint is reported in one line and
  moved aside (checkpoint.py; $AGCG_STRICT_CHECKPOINTS=1 refuses instead).
  """
  mesh = mesh or sh.data_mesh()
  directory = os.path.join(workdir, stage, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"no {stage} checkpoint in {directory}: run `agcg train-{stage}` first")
  _check_trained_networks(config, workdir, stage)
  ckpt = Checkpointer(directory, keep=1000, asynchronous=False)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  try:
    restored = ckpt.restore_newest(abstract_with_shardings(abstract, sh.replicated(mesh)),
                                   with_data=False)
  except ckpt_lib.NetworksMismatch as e:
    raise _mismatch(stage, directory, e) from None
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"no complete {stage} checkpoint in {directory}: run `agcg train-{stage}` first")
  state, _, step = restored
  return state.params, int(step)


# ---------------------------------------------------------------- the stages


def check_image_size(config, ddir: str) -> None:
  info = pipeline.dataset_info(ddir)
  size = info.get("image_size")
  if size is not None and int(size) != int(config.data.image_size):
    raise UserError(f"dataset in {ddir} holds {size}x{size} images but data.image_size="
                    f"{config.data.image_size}; set --config.data.image_size={size} or prepare again")


def classifier_stage(config, workdir: str, mesh) -> Stage:
  ddir = data_dir(config, workdir)
  check_image_size(config, ddir)
  source = pipeline.open_source(ddir, "train")
  c = config.classifier
  weights = None
  if c.class_weights:
    counts = np.bincount(pipeline.labels_of(source), minlength=NUM_CLASSES).astype(np.float64)
    weights = jnp.asarray(counts.sum() / (NUM_CLASSES * np.maximum(counts, 1)), jnp.float32)
  return Stage(
      name="classifier", init_fn=S.classifier_init_fn(config),
      step_fn=functools.partial(steps.classifier_train_step, model=S.classifier_model(config),
                                class_weights=weights),
      make_batches=lambda b, i, n: pipeline.classifier_batches(
          source, batch_size=b, seed=config.seed, shard_index=i, shard_count=n,
          worker_count=config.data.workers),
      global_batch=sh.global_batch_size(c.batch_per_device, c.global_batch, mesh, "classifier"),
      total_steps=c.steps, log_every=c.log_every, ckpt_every=c.ckpt_every, keep=c.keep,
      seed=config.seed)


def gan_stage(config, workdir: str, mesh) -> Stage:
  ddir = data_dir(config, workdir)
  check_image_size(config, ddir)
  source = pipeline.open_source(ddir, "train")
  g = config.gan
  return Stage(
      name="gan", init_fn=S.gan_init_fn(config),
      step_fn=functools.partial(steps.gan_train_step, models=S.gan_models(config.model), cfg=g),
      make_batches=lambda b, i, n: pipeline.gan_batches(
          source, batch_size=b, seed=config.seed, shard_index=i, shard_count=n,
          worker_count=config.data.workers),
      global_batch=sh.global_batch_size(g.batch_per_device, g.global_batch, mesh, "gan"),
      total_steps=g.steps, log_every=g.log_every, ckpt_every=g.ckpt_every, keep=g.keep,
      seed=config.seed + 1)


def ctr_stage(config, workdir: str, mesh) -> Stage:
  """The CTR regressor: measures a translated heart by something other than the GAN (phantoms)."""
  ddir = data_dir(config, workdir)
  check_image_size(config, ddir)
  source = pipeline.open_source(ddir, "train")
  c = config.ctr
  return Stage(
      name="ctr", init_fn=S.ctr_init_fn(config),
      step_fn=functools.partial(steps.ctr_train_step, model=S.ctr_model(config)),
      make_batches=lambda b, i, n: pipeline.classifier_batches(
          source, batch_size=b, seed=config.seed + 2, shard_index=i, shard_count=n,
          fields=("ctr",), worker_count=config.data.workers),
      global_batch=sh.global_batch_size(c.batch_per_device, 0, mesh, "ctr"),
      total_steps=c.steps, log_every=c.log_every, ckpt_every=max(c.steps, 1), keep=1,
      seed=config.seed + 2)


STAGES = {"classifier": classifier_stage, "gan": gan_stage, "ctr": ctr_stage}


def train_stage(name: str, config, workdir: str, mesh=None, progress: bool = True):
  """Trains stage `name` ('classifier', 'gan' or 'ctr'), resuming if the workdir has checkpoints."""
  mesh = mesh or sh.data_mesh()
  _record_stage_config(config, workdir, name)
  return run_stage(STAGES[name](config, workdir, mesh), workdir, mesh, progress)


def train_classifier(config, workdir: str, mesh=None, progress=True):
  return train_stage("classifier", config, workdir, mesh, progress)


def train_gan(config, workdir: str, mesh=None, progress=True):
  return train_stage("gan", config, workdir, mesh, progress)


def train_ctr(config, workdir: str, mesh=None, progress=True):
  if config.data.kind != "phantoms":
    raise UserError("train-ctr needs phantom data (ground-truth CTR); data.kind is "
                    f"{config.data.kind!r}")
  return train_stage("ctr", config, workdir, mesh, progress)
