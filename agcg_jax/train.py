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
import numpy as np
from jax.experimental import multihost_utils

from agcg_jax import workdir as wd
from agcg_jax import progress as progress_lib
from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import segment
from agcg_jax import steps
from agcg_jax import checkpoint as ckpt_lib
from agcg_jax.checkpoint import Checkpointer, abstract_with_shardings
from agcg_jax.data import pipeline
from agcg_jax.data.records import NUM_CLASSES
from agcg_jax.distributed import is_main_process
from agcg_jax.errors import UserError
from agcg_jax.event_log import EventLog

class NonFiniteLoss(UserError):
  """Training produced a non-finite loss or gradient norm."""


def _record_stage_config(config, workdir: str, stage: str) -> None:
  """Records or checks <workdir>/<stage>/config.json (workdir.py); a failed write is one line."""
  if not is_main_process():
    return
  try:
    changed = wd.record_stage_config(config, workdir, stage)
  except OSError as e:
    ckpt_dir = wd.checkpoints_dir(workdir, stage)
    raise ckpt_lib.WriteError(ckpt_lib.write_failure(
        e.filename or wd.stage_config(workdir, stage), e, ckpt_dir,
        ckpt_lib.last_step_on_disk(ckpt_dir))) from None
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
  seed: int                    # the run seed; stage_key / stage_seed derive the stage's streams
  replicate: int = 0           # > 0: another init and data order of this stage alone (e.g. gan.replicate)


def _check_finite(metrics: dict, step: int, stage: str) -> None:
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise NonFiniteLoss(f"{stage}: non-finite {', '.join(sorted(bad))} at step {step}; "
                        "training stopped (the last checkpoint is kept): lower the learning rates "
                        "or use model.dtype=float32")


@dataclasses.dataclass
class Compiled:
  """A stage's jitted functions and the state's layout: what training and `agcg bench` run."""
  key: jax.Array               # the stage's init key
  abstract: Any                # the state's structure (ShapeDtypeStructs), computed shape-first
  shardings: Any               # the state's shardings (replicated: data parallel)
  init: Callable               # key -> state, materialised directly with `shardings`
  step: Callable               # (state, global batch) -> (state, metrics); the state is donated


# Each stage's random streams are its own: the run seed's key folded with the stage's tag.
_STAGE_TAGS = {"classifier": 0, "gan": 1, "ctr": 2, "segmenter": 3}


def stage_key(seed: int, stage: str, replicate: int = 0) -> jax.Array:
  """The stage's init key: `jax.random.key(seed)` folded in with the stage's tag (and replicate)."""
  key = jax.random.fold_in(jax.random.key(seed), _STAGE_TAGS[stage])
  return jax.random.fold_in(key, replicate) if replicate else key


def stage_seed(seed: int, stage: str, replicate: int = 0) -> int:
  """An integer seed of the stage's data order (Grain), independent of the other stages'."""
  entropy = [seed, _STAGE_TAGS[stage]] + ([replicate] if replicate else [])
  return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def compile_stage(stage: Stage, mesh) -> Compiled:
  """Jits a stage's init and step for `mesh`: the one place both are compiled."""
  replicated = sh.replicated(mesh)
  key = stage_key(stage.seed, stage.name, stage.replicate)
  abstract = jax.eval_shape(stage.init_fn, key)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  return Compiled(
      key=key, abstract=abstract, shardings=shardings,
      init=jax.jit(stage.init_fn, out_shardings=shardings),
      step=jax.jit(stage.step_fn, donate_argnums=0, out_shardings=(shardings, replicated)))


def itstime(step: int, every: int, last: bool = False) -> bool:
  """Whether a periodic action (log, checkpoint, sync) happens after `step`: every `every` steps and at the last."""
  return last or (every > 0 and step % every == 0)


def run_stage(stage: Stage, workdir: str, mesh=None, progress: bool = True) -> tuple[S.TrainState, str]:
  """Trains `stage` to total_steps, resuming from <workdir>/<name>/checkpoints.

  Returns (state, status) with status 'done' or 'stopped' (SIGTERM: a
  checkpoint was saved first).
  """
  mesh = mesh or sh.data_mesh()
  ckpt = Checkpointer(wd.checkpoints_dir(workdir, stage.name), stage.keep)
  replicated = sh.replicated(mesh)
  # Shape-first: the state's structure without computing it, then a jitted
  # init that materialises it directly with the replicated sharding.
  compiled = compile_stage(stage, mesh)

  n_proc = jax.process_count()
  per_process = stage.global_batch // n_proc
  batches = stage.make_batches(per_process, jax.process_index(), n_proc)
  metrics_path = wd.training_log(workdir, stage.name)

  def write_failed(e: OSError) -> UserError:
    return ckpt_lib.WriteError(ckpt_lib.write_failure(
        e.filename or metrics_path, e, ckpt.directory, ckpt.last_complete_step()))

  try:
    restored = ckpt.restore_newest(abstract_with_shardings(compiled.abstract, replicated))
    if restored is not None:
      state, data_state, start = restored
      if data_state is not None:
        batches.set_state(data_state)
      start = int(start)
      if is_main_process():
        print(f"agcg: {stage.name}: resuming from step {start} of {stage.total_steps} "
              f"({ckpt.directory})", flush=True)
    else:
      state = compiled.init(compiled.key)
      start = 0
    log = MetricsLog(metrics_path, start, is_main_process())
    # Nothing to train, nothing written (a finished run's workdir may be read-only).
    events = EventLog(wd.events_dir(workdir, stage.name),
                      enabled=is_main_process() and start < stage.total_steps,
                      resume_step=start if start else None)
  except ckpt_lib.NetworksMismatch as e:
    ckpt.close()
    raise ckpt_lib.mismatch(stage.name, ckpt.directory, e) from None
  except OSError as e:
    ckpt.close()
    raise write_failed(e) from None
  except BaseException:
    ckpt.close()
    raise
  jstep = compiled.step

  # The next batch goes to the device while the step runs; its Grain state is
  # the consumer's (not the prefetched one's), so a checkpoint resumes exactly.
  device_batches = sh.prefetch_to_device(batches, size=2, sharding=sh.batch_sharded(mesh))
  status = "done"
  bar = progress_lib.bar(total=stage.total_steps, initial=start, desc=stage.name, unit="step",
                         disable=not (progress and is_main_process()))
  t_last, n_last = time.perf_counter(), start
  sync_every = max(1, min(stage.log_every, 10))
  try:
    with StopSignal() as stop:
      step = start
      while step < stage.total_steps:
        batch = next(device_batches)
        state, metrics = jstep(state, batch)
        step += 1
        bar.update(1)
        last = step == stage.total_steps
        if itstime(step, stage.log_every, last):
          host = jax.device_get(metrics)
          _check_finite(host, step, stage.name)
          now = time.perf_counter()
          row = {"step": step, **{k: float(v) for k, v in sorted(host.items())},
                 "images_per_s": stage.global_batch * (step - n_last) / max(now - t_last, 1e-9)}
          t_last, n_last = now, step
          try:
            log.write(row)
            events.scalars(step, row)
          except OSError as e:
            raise write_failed(e) from None
          bar.set_postfix({k: f"{row[k]:.3g}" for k in list(row)[1:4]}, refresh=False)
        stopping = stop.requested
        if jax.process_count() > 1:
          # Every process must take the same decision at the same step, or the
          # collective save hangs: all of them compare flags every few steps.
          stopping = False
          if itstime(step, sync_every, last):
            stopping = bool(multihost_utils.process_allgather(np.array(stop.requested)).any())
        if itstime(step, stage.ckpt_every, last) or stopping:
          ckpt.save(step, state, device_batches.get_state())
        if stopping:
          status = "stopped"
          break
  finally:
    # Also on an error or a hard interrupt: finish the saves in flight, so
    # the last checkpoint is complete.
    bar.close()
    events.close()
    ckpt.close()
  return state, status


# ---------------------------------------------------------------- the stages


def _train_source(config, workdir: str | None):
  """The training split of the config's dataset; None without a workdir (`agcg bench` feeds its own)."""
  if workdir is None:
    return None
  ddir = wd.dataset_dir(config, workdir)
  wd.check_image_size(config, ddir)
  return pipeline.open_source(ddir, "train")


def classifier_stage(config, workdir: str | None, mesh) -> Stage:
  source = _train_source(config, workdir)
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
          source, batch_size=b, seed=stage_seed(config.seed, "classifier"), shard_index=i,
          shard_count=n, worker_count=config.data.workers),
      global_batch=sh.global_batch_size(c.batch_per_device, c.global_batch, mesh, "classifier"),
      total_steps=c.steps, log_every=c.log_every, ckpt_every=c.ckpt_every, keep=c.keep,
      seed=config.seed)


def gan_stage(config, workdir: str | None, mesh) -> Stage:
  source = _train_source(config, workdir)
  g = config.gan
  return Stage(
      name="gan", init_fn=S.gan_init_fn(config),
      step_fn=functools.partial(steps.gan_train_step, models=S.gan_models(config.model), cfg=g,
                                mean_over_shards=functools.partial(sh.mean_over_shards, mesh=mesh)),
      make_batches=lambda b, i, n: pipeline.gan_batches(
          source, batch_size=b, seed=stage_seed(config.seed, "gan", g.replicate), shard_index=i,
          shard_count=n, worker_count=config.data.workers),
      global_batch=sh.global_batch_size(g.batch_per_device, g.global_batch, mesh, "gan"),
      total_steps=g.steps, log_every=g.log_every, ckpt_every=g.ckpt_every, keep=g.keep,
      seed=config.seed, replicate=g.replicate)


def ctr_stage(config, workdir: str | None, mesh) -> Stage:
  """The CTR regressor: measures a translated heart by something other than the GAN (phantoms)."""
  source = _train_source(config, workdir)
  c = config.ctr
  return Stage(
      name="ctr", init_fn=S.ctr_init_fn(config),
      step_fn=functools.partial(steps.ctr_train_step, model=S.ctr_model(config)),
      make_batches=lambda b, i, n: pipeline.classifier_batches(
          source, batch_size=b, seed=stage_seed(config.seed, "ctr"), shard_index=i,
          shard_count=n, fields=("ctr",), worker_count=config.data.workers),
      global_batch=sh.global_batch_size(c.batch_per_device, 0, mesh, "ctr"),
      total_steps=c.steps, log_every=c.log_every, ckpt_every=max(c.steps, 1), keep=1,
      seed=config.seed)


def segmenter_stage(config, workdir: str | None, mesh) -> Stage:
  """The heart-and-lung segmenter (segment.py): the CTR ruler of real radiographs.

  Trained on the training split of the outlined set the config names (data or
  eval_data of kind ctr_masks); evaluation measures translated hearts with it.
  """
  masks = wd.masks_config(config)
  if masks is None:
    raise UserError("train-segmenter needs outlined radiographs: data.kind or eval_data.kind "
                    "must be 'ctr_masks'")
  source = _train_source(masks, workdir)
  g = config.segmenter
  model = segment.segmenter_model(g.width, g.depth, g.patch)
  return Stage(
      name="segmenter",
      init_fn=segment.segmenter_init_fn(g.width, config.data.image_size, g.lr, g.steps,
                                        depth=g.depth, patch=g.patch),
      step_fn=functools.partial(
          segment.segmenter_train_step, model=model,
          augment_key=stage_key(config.seed, "segmenter") if g.augment else None),
      make_batches=lambda b, i, n: pipeline.classifier_batches(
          source, batch_size=b, seed=stage_seed(config.seed, "segmenter"), shard_index=i,
          shard_count=n, fields=("heart_mask", "lung_mask", "ctr"),
          worker_count=config.data.workers),
      global_batch=sh.global_batch_size(g.batch_per_device, 0, mesh, "segmenter"),
      total_steps=g.steps, log_every=g.log_every, ckpt_every=max(g.steps, 1), keep=1,
      seed=config.seed)


STAGES = {"classifier": classifier_stage, "gan": gan_stage, "ctr": ctr_stage,
          "segmenter": segmenter_stage}


def train_stage(name: str, config, workdir: str, mesh=None, progress: bool = True):
  """Trains stage `name` ('classifier', 'gan' or 'ctr'), resuming if the workdir has checkpoints."""
  if name == "ctr" and config.data.kind != "phantoms":
    raise UserError("train-ctr needs phantom data (ground-truth CTR); data.kind is "
                    f"{config.data.kind!r}")
  mesh = mesh or sh.data_mesh()
  _record_stage_config(config, workdir, name)
  return run_stage(STAGES[name](config, workdir, mesh), workdir, mesh, progress)


def train_classifier(config, workdir: str, mesh=None, progress=True):
  return train_stage("classifier", config, workdir, mesh, progress)


def train_gan(config, workdir: str, mesh=None, progress=True):
  return train_stage("gan", config, workdir, mesh, progress)


def train_ctr(config, workdir: str, mesh=None, progress=True):
  return train_stage("ctr", config, workdir, mesh, progress)
