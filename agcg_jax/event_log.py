"""Training scalars as TensorBoard event files (tensorboardX; no TensorFlow).

The training loop writes one directory per stage beside its metrics.jsonl,
e.g. `<workdir>/<stage>/events/`, and `tensorboard --logdir <workdir>` shows
every stage as a run:

    with EventLog(os.path.join(stage_dir, "events"), enabled=is_main_process(),
                  resume_step=start) as events:
      ...
      events.scalars(step, host_metrics)

tensorboardX is imported only when a log is enabled: a disabled `EventLog`
(other processes, or logging turned off) needs nothing, and an enabled one
without tensorboardX installed stops with one `UserError` line saying what to
install, before any training step runs.

Resume: TensorBoard's own mechanism. A log opened with `resume_step=k`
starts a new event file whose first event tells readers to drop every value
logged at step > k in earlier files (those steps are trained again), the
same rule as metrics.jsonl. `read_scalars` applies it too.

Values are stored as TensorBoard's `simple_value`, a float32: NaN and
+/-inf are written as they are (TensorBoard plots them as such).
"""
from __future__ import annotations

import glob
import importlib
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agcg_jax.errors import UserError

# The requirement the error message names (and pyproject should carry).
REQUIREMENT = "tensorboardX>=2.6,<3"


def _require_tensorboardx() -> None:
  try:
    importlib.import_module("tensorboardX")
  except ImportError:
    raise UserError("TensorBoard event files need the tensorboardX package: "
                    f"pip install '{REQUIREMENT}'") from None


def _as_float(key: str, value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number)
                             or array.dtype == np.bool_):
    raise ValueError(f"scalar {key!r}: expected one number, got "
                     f"{array.dtype} of shape {array.shape}")
  return float(array.reshape(()))


class EventLog:
  """Writes scalars to a new TensorBoard event file in `logdir`; a context manager.

  Writes are synchronous and reach the file at every `scalars` call (one
  small record per step: nothing next to a training step), so a killed run
  loses nothing it logged and readers see each step at once. tensorboardX's
  `SummaryWriter` queues events to a thread instead, and its `flush` does
  not wait for that queue; its `EventsWriter` and protobufs are used here.

  Args:
    logdir: the run's directory (created if missing); one per stage.
    enabled: False makes every method a no-op and imports nothing (use it
      on processes other than 0, or when logging is turned off).
    resume_step: the step training restarts from; values logged earlier
      at later steps are hidden from TensorBoard (None: a fresh run).

  Raises:
    UserError: enabled, and tensorboardX is not installed.
  """

  def __init__(self, logdir: str, *, enabled: bool = True,
               resume_step: int | None = None):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._writer = None
    if not enabled:
      return
    _require_tensorboardx()
    from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(self.logdir, exist_ok=True)
    # Files are named events.out.tfevents.<seconds>.<host><suffix>: a resume
    # within the same second would truncate the first file. The nanosecond
    # suffix keeps names unique and in writing order (readers sort by name).
    self._writer = event_file_writer.EventsWriter(
        os.path.join(self.logdir, "events"), f".{time.time_ns()}")
    if resume_step is not None:
      # TensorBoard's purge marker: earlier values at steps >= this one are
      # dropped by readers (tensorboardX's SummaryWriter(purge_step=...)).
      self._writer.write_event(event_pb2.Event(
          step=int(resume_step) + 1, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._writer.flush()

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Logs each value under its key as tag, at `step`, and writes it to the file.

    Args:
      step: the x-axis (training step).
      values: name -> one number (Python, numpy or jax scalar, or a
        one-element array). A "step" entry is skipped: it is the x-axis.

    Raises:
      ValueError: a value that is not a single number (nothing is written).
    """
    if not self.enabled:
      return
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=key, simple_value=_as_float(key, value))
        for key, value in values.items() if key != "step"])
    self._writer.write_event(self._event_pb2.Event(
        step=int(step), wall_time=time.time(), summary=summary))
    self._writer.flush()

  def flush(self) -> None:
    """Writes everything logged so far to disk (already done by `scalars`)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the file; later calls do nothing."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self.enabled = False

  def __enter__(self) -> EventLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Reading back (tests, notebooks): the TFRecord framing of event files.
# --------------------------------------------------------------------------


def _records(path: str):
  """Payloads of the records of one event file, stopping at a torn or corrupt tail.

  Each record: uint64 length, uint32 masked CRC32C of the length, payload,
  uint32 masked CRC32C of the payload (little-endian).
  """
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    end = pos + 12 + length + 4
    if header_crc != masked_crc32c(header) or end > len(data):
      return  # a write cut short by a kill
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[end - 4:end])
    if payload_crc != masked_crc32c(payload):
      return
    yield payload
    pos = end


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files of `logdir`, as TensorBoard shows them.

  Files are read in name (= writing) order; a resumed log's start marker
  drops the values at or after its step from the files before it.

  Returns:
    {tag: [(step, value), ...]} in logging order; values are float32
    rounded (as stored), NaN and inf included.

  Raises:
    UserError: tensorboardX is not installed.
  """
  _require_tensorboardx()
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(logdir)),
                                            "events.out.tfevents.*"))):
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      if (event.HasField("session_log")
          and event.session_log.status == event.session_log.START):
        for tag, points in out.items():
          out[tag] = [(s, v) for s, v in points if s < event.step]
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append(
              (int(event.step), float(value.simple_value)))
  return out
