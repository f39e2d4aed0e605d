"""Orbax checkpoints: the train state and the data iterator's state, saved together.

Saves are asynchronous (training continues while the files are written) and
atomic (Orbax writes to a temporary directory and renames it when complete),
so a killed run resumes from its last *complete* checkpoint. Nothing is
loaded with pickle: arrays come back through the abstract target, the
iterator state as JSON.

Faults:

- A damaged checkpoint (junk or cut-short data files, unreadable metadata)
  is not fatal: `restore_newest` tries the newest step first and, if it
  cannot be read, prints one line naming it, moves it aside to
  `<step>.damaged-<UTC time>` (not a step name to Orbax, which then ignores
  it; nothing is deleted) and falls back to the newest step that can be
  read. `AGCG_STRICT_CHECKPOINTS=1` refuses instead (one line, exit 2).
  If no step can be read, nothing is moved and the error is one line. A
  checkpoint whose tree metadata reads fine but describes other networks
  is not damage: that stays the "trained with other networks" error.
- A save that fails (no space, no permission, a read-only filesystem) stops
  with one line (WriteError) naming the checkpoint and the last complete
  step; the steps already on disk are untouched (the failed one never got
  its final name). Step directories are made before `save` returns, so a
  directory that refuses them fails at once.
- Orbax reads and writes arrays through tensorstore on private asyncio
  loops; when one operation fails, its siblings finish after that loop is
  closed and each prints a traceback ("Event loop is closed", "Future
  exception was never retrieved"), and Orbax logs the failure from each of
  its threads. Those echo the one failure already reported in one line, so
  they are dropped: Orbax's log records are held during a read, and during
  a save until it is known complete, then shown if it succeeded
  (`_quiet`, `Checkpointer.save`/`wait`).
"""
import contextlib
import datetime
import gc
import logging
import os
import re
import sys
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from agcg_jax import sharding as sh
from agcg_jax import workdir as wd
from agcg_jax.errors import UserError

STRICT_ENV = "AGCG_STRICT_CHECKPOINTS"
DAMAGED_TAG = ".damaged-"


class NetworksMismatch(UserError):
  """The checkpoint holds a readable tree of other networks than the target."""


class WriteError(UserError):
  """A run's file could not be written (disk full, no permission, read-only filesystem)."""


def strict_from_env() -> bool:
  return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def write_failure(path: str, error: BaseException, directory: str, last_step: int | None) -> str:
  """One line: what could not be written, why, and what is safe on disk."""
  reason = getattr(error, "strerror", None) or short_reason(error)
  saved = (f"the last complete checkpoint is step {last_step} in {directory}"
           if last_step is not None else f"no complete checkpoint in {directory} yet")
  return (f"cannot write {path} ({reason}); {saved}: free space or fix the permissions, "
          "then run the same command to resume")


def short_reason(error: BaseException, limit: int = 140) -> str:
  """The innermost cause of `error` in one short line, without tensorstore's dump.

  'DATA_LOSS: Error opening "zarr" driver: Error reading "params.x/.zarray" in
  OCDBT database at local file "...": Error decoding ...; at byte 0' becomes
  'params.x: Error decoding ...'.
  """
  root, seen = error, {id(error)}
  while (root.__cause__ or root.__context__) is not None and id(root.__cause__ or root.__context__) not in seen:
    root = root.__cause__ or root.__context__
    seen.add(id(root))
  lines = str(root).strip().splitlines()
  text = re.sub(r"\s*\[(os_error_code|tensorstore_spec)\b.*$", "", lines[0] if lines else "")
  read = re.match(r'^[A-Z_]+: .*Error reading "([^"]+)"(?: in OCDBT database at local file "[^"]*")?: (.*)$',
                  text)
  written = re.match(r"^[A-Z_]+: Error writing .*: ([^:]+)$", text)
  if written:  # '...: Failed to write 89670 bytes to file 5: No space left on device'
    text = written.group(1).strip()
  elif read:
    array = re.sub(r"/(\.zarray|[0-9.]+)$", "", read.group(1))
    text = f"{array}: {read.group(2).split(';')[0]}"
  elif not re.match(r"^[A-Z_]+: ", text):
    text = f"{type(root).__name__}: {text}" if text else type(root).__name__
  text = re.sub(r'local file "[^"]*/checkpoints/\d+/', 'file "', text)  # paths inside the step
  return text if len(text) <= limit else text[:limit - 3] + "..."


def last_step_on_disk(directory: str, excluding: int | None = None) -> int | None:
  """The newest step folder in `directory` (Orbax names a step only once it is complete)."""
  try:
    steps = [int(n) for n in os.listdir(directory)
             if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
  except OSError:
    return None
  steps = [s for s in steps if s != excluding]
  return max(steps) if steps else None


# ------------------------------------------------------ Orbax's noise on failure

_loop_closed_dropped = False
_aftermath_dropped = False


def _drop_loop_closed() -> None:
  """Drops the "Event loop is closed" tracebacks tensorstore prints via sys.unraisablehook.

  Each is a read or write finishing after Orbax closed the loop of an
  operation that had already failed; that failure is reported on its own.
  """
  global _loop_closed_dropped
  if _loop_closed_dropped:
    return
  _loop_closed_dropped = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    # After a failed read or write, Orbax's sibling reads of the same checkpoint
    # end as never-awaited coroutines whose exceptions Python prints one by one
    # (hundreds for a damaged step): echoes of the failure already reported.
    if _aftermath_dropped and _unraisable_from_orbax(unraisable):
      return
    previous(unraisable)
  sys.unraisablehook = hook


def _unraisable_from_orbax(unraisable) -> bool:
  """Whether an unraisable exception was raised in Orbax or tensorstore code."""
  tb = getattr(unraisable, "exc_traceback", None)
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if f"{os.sep}orbax{os.sep}" in name or f"{os.sep}tensorstore{os.sep}" in name:
      return True
    tb = tb.tb_next
  code = getattr(getattr(unraisable, "object", None), "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _NeverRetrieved(logging.Filter):
  def filter(self, record):
    return "exception was never retrieved" not in str(record.msg)


def _drop_aftermath() -> None:
  """After a failed read or write: drop the late echoes of its sibling operations."""
  global _aftermath_dropped
  _drop_loop_closed()
  if _aftermath_dropped:
    return
  _aftermath_dropped = True
  logging.getLogger("asyncio").addFilter(_NeverRetrieved())
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


class _Hold(logging.Filter):
  """Holds back a logger's records (those `only` selects); they are replayed or dropped later."""

  def __init__(self, only=None):
    super().__init__()
    self.only = only
    self.records = []

  def filter(self, record):
    if self.only is not None and not self.only(record):
      return True
    self.records.append(record)
    return False

  def replay(self, logger) -> None:
    records, self.records = self.records, []
    for record in records:
      logger.callHandlers(record)


def _from_orbax(record) -> bool:
  return f"{os.sep}orbax{os.sep}" in record.pathname


@contextlib.contextmanager
def _quiet():
  """Runs an Orbax read; its absl/asyncio log records are shown only if it succeeds."""
  loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
  holds = [_Hold() for _ in loggers]
  for logger, hold in zip(loggers, holds):
    logger.addFilter(hold)
  failed = True
  try:
    yield
    failed = False
  finally:
    if failed:
      _drop_aftermath()
      gc.collect()  # futures that failed unseen report now, while held
    for logger, hold in zip(loggers, holds):
      logger.removeFilter(hold)
      if not failed:
        hold.replay(logger)


# ------------------------------------------------------------------ the manager


class Checkpointer:
  """A CheckpointManager in `directory` keeping the last `keep` checkpoints."""

  def __init__(self, directory: str, keep: int, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    # Directories are made before save() returns (the arrays are still written
    # in the background): a workdir that cannot take them then fails there, at
    # once. Made in the background, the failure left Orbax's writer threads
    # waiting 5 minutes for a "directory created" signal before the process
    # could exit.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    # Orbax reads every step's metadata file here; its complaints about one
    # are held until that step is tried (restore_newest): dropped if the step
    # is damaged (the warning names it), shown otherwise.
    absl, hold = logging.getLogger("absl"), _Hold()
    absl.addFilter(hold)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise WriteError(write_failure(
          e.filename or self.directory, e, self.directory, self.last_complete_step())) from None
    finally:
      absl.removeFilter(hold)
    self._held: dict[int, list[logging.LogRecord]] = {}
    for record in hold.records:
      about = re.search(re.escape(self.directory) + r"/(\d+)/", record.getMessage())
      if about:
        self._held.setdefault(int(about.group(1)), []).append(record)
      else:
        absl.callHandlers(record)
    self._in_flight: int | None = None
    self._failed = False
    self._save_hold: _Hold | None = None
    _drop_loop_closed()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def last_complete_step(self, excluding: int | None = None) -> int | None:
    return last_step_on_disk(self.directory, excluding)

  def _write_error(self, step: int | None, error: BaseException) -> WriteError:
    self._failed = True
    _drop_aftermath()  # the Orbax records held since the save are dropped with it (never replayed)
    path = self._step_path(step) if step is not None else self.directory
    return WriteError(write_failure(path, error, self.directory,
                                    self.last_complete_step(excluding=step)))

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    """Starts saving `step`; a failure of this or the previous save is a WriteError.

    Orbax's own log records (absl) are held from here until the save is
    known to be complete: shown then, dropped if it failed (the WriteError's
    one line says it).
    """
    self.wait()
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    if self._save_hold is None:
      self._save_hold = _Hold(only=_from_orbax)
      logging.getLogger("absl").addFilter(self._save_hold)
    try:
      self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except  (OSError, or tensorstore's ValueError)
      raise self._write_error(step, e) from None
    self._in_flight = step

  def wait(self) -> None:
    """Waits for the save in flight; its failure is a WriteError naming its step.

    After one write error, later ones (Orbax repeats the background error)
    are not raised again.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not self._failed:
        raise self._write_error(step, e) from None
      return
    if self._save_hold is not None and not self._failed:
      self._save_hold.replay(logging.getLogger("absl"))

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
      # After a failure the hold stays on: Orbax's writer threads may still
      # log their part of it.
      if self._save_hold is not None and not self._failed:
        logging.getLogger("absl").removeFilter(self._save_hold)
        self._save_hold.replay(logging.getLogger("absl"))
        self._save_hold = None

  def restore(self, step: int, abstract_state: Any, with_data: bool = True):
    """Restores (state, data_state) at `step` into the structure/shardings of `abstract_state`."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and "data" in self._item_names(step):
      args["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], (restored["data"] if "data" in args else None)

  def restore_newest(self, abstract_state: Any, with_data: bool = True, strict: bool | None = None):
    """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

    A damaged newer one is reported in one line and moved aside (module
    docstring); `strict` (default: $AGCG_STRICT_CHECKPOINTS) refuses
    instead. Raises NetworksMismatch when a checkpoint's tree describes
    other networks, UserError when no checkpoint can be read.
    """
    strict = strict_from_env() if strict is None else strict
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged: list[tuple[int, str]] = []
    for step in steps:
      try:
        with _quiet():
          state, data_state = self.restore(step, abstract_state, with_data)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, JSON, a missing file)
        mismatch = self._tree_mismatch(step, abstract_state)
        if mismatch:
          raise NetworksMismatch(mismatch) from None
        damaged.append((step, short_reason(e)))
        if strict:
          self._release_held(dropped=[step])
          raise UserError(
              f"checkpoint {self._step_path(step)} is damaged ({damaged[0][1]}); not falling "
              f"back to an older one because {STRICT_ENV}=1: unset it to use the newest readable "
              "checkpoint, or move the damaged one away") from None
        continue
      self._release_held(dropped=[s for s, _ in damaged])
      for bad, reason in damaged:
        moved = self._move_aside(bad)
        if jax.process_index() == 0:
          print(f"agcg: warning: checkpoint {self._step_path(bad)} is damaged ({reason}); "
                f"{moved}; using step {step}", file=sys.stderr, flush=True)
      if damaged:
        self._manager.reload()
      return state, data_state, step
    self._release_held(dropped=[s for s, _ in damaged])
    if damaged:
      listed = ", ".join(str(s) for s, _ in damaged)
      raise UserError(f"no readable checkpoint in {self.directory}: step(s) {listed} cannot be read "
                      f"(newest: {damaged[0][1]}); nothing was moved: remove the folder to start "
                      "again, or restore it from a copy")
    return None

  def _release_held(self, dropped) -> None:
    absl = logging.getLogger("absl")
    for step, records in sorted(self._held.items()):
      if step not in dropped:
        for record in records:
          absl.callHandlers(record)
    self._held = {}

  def _step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of Orbax's step names; says where it went."""
    if jax.process_index() != 0:
      return "moved aside by process 0"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = f"{self._step_path(step)}{DAMAGED_TAG}{stamp}"
    try:
      os.rename(self._step_path(step), target)
    except OSError as e:
      return f"left in place (cannot rename it: {e.strerror})"
    return f"moved to {os.path.basename(target)}"

  def _tree_mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How a checkpoint's tree differs from the target's, or None (same tree, or unreadable)."""
    try:
      with _quiet():
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_path(step)) / "state")
      saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: damage, not a mismatch)
      return None
    wanted = {_path_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    if not saved:
      return None
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    params_first = lambda k: (not k.startswith("params."), k)
    missing = sorted(missing, key=params_first)
    extra = sorted(extra, key=params_first)
    shapes = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]), key=params_first)
    if not (missing or extra or shapes):
      return None
    if shapes:
      k = shapes[0]
      return f"{k} is {saved[k]} there, {wanted[k]} here"
    k = (missing or extra)[0]
    return f"{k} is {'missing there' if missing else 'not in these networks'}"

  def _item_names(self, step: int) -> set[str]:
    path = self._step_path(step)
    return set(os.listdir(path)) if os.path.isdir(path) else set()


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def abstract_with_shardings(abstract_state, sharding) -> Any:
  """jax.ShapeDtypeStruct leaves carrying `sharding`, the target for a sharded restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)


def mismatch(stage: str, directory: str, detail) -> UserError:
  """The one-line error for a checkpoint whose networks are not the config's."""
  return UserError(f"the {stage} checkpoint in {directory} does not match the config's networks "
                   f"({detail}): use the config it was trained with")


def restore_params(workdir: str, stage: str, init_fn, mesh=None, config=None) -> tuple[dict, int]:
  """The params of a stage's newest readable checkpoint, or a UserError saying to train it first.

  With `config`, the networks recorded in the stage's config.json are checked
  against it first. A damaged newer checkpoint is reported in one line and
  moved aside ($AGCG_STRICT_CHECKPOINTS=1 refuses instead).
  """
  mesh = mesh or sh.data_mesh()
  directory = wd.checkpoints_dir(workdir, stage)
  if not os.path.isdir(directory):
    raise UserError(f"no {stage} checkpoint in {directory}: run `agcg train-{stage}` first")
  wd.check_trained_networks(config, workdir, stage)
  ckpt = Checkpointer(directory, keep=1000, asynchronous=False)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  try:
    restored = ckpt.restore_newest(abstract_with_shardings(abstract, sh.replicated(mesh)),
                                   with_data=False)
  except NetworksMismatch as e:
    raise mismatch(stage, directory, e) from None
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"no complete {stage} checkpoint in {directory}: run `agcg train-{stage}` first")
  state, _, step = restored
  return state.params, int(step)
