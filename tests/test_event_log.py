"""Tests of the TensorBoard event writer: what is written reads back the same."""
import glob
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from agcg_jax import event_log
from agcg_jax.errors import UserError


def _event_files(logdir):
  return glob.glob(os.path.join(logdir, "events.out.tfevents.*"))


def test_scalars_round_trip(tmp_path):
  logdir = os.fspath(tmp_path / "gan")
  rows = [{"step": s, "g_loss": 1.0 / s, "d_loss": np.float32(2.5 * s),
           "lr": jnp.asarray(1e-4 * s), "images_per_s": 100 + s}
          for s in (10, 20, 30)]
  with event_log.EventLog(logdir) as log:
    for row in rows:
      log.scalars(row["step"], row)
  assert len(_event_files(logdir)) == 1
  got = event_log.read_scalars(logdir)
  assert set(got) == {"g_loss", "d_loss", "lr", "images_per_s"}  # "step" is the x-axis
  for tag in got:
    assert [s for s, _ in got[tag]] == [10, 20, 30]
    # Stored as float32 (TensorBoard's simple_value).
    want = [float(np.float32(np.asarray(r[tag]))) for r in rows]
    assert [v for _, v in got[tag]] == want


def test_non_finite_values_are_written_as_they_are(tmp_path):
  logdir = os.fspath(tmp_path)
  with event_log.EventLog(logdir) as log:
    log.scalars(1, {"a": float("nan"), "b": np.float32("inf"), "c": -np.inf})
    log.scalars(2, {"a": 0.5, "b": 1.0, "c": 2.0})
  got = event_log.read_scalars(logdir)
  assert np.isnan(got["a"][0][1]) and got["a"][1] == (2, 0.5)
  assert got["b"][0] == (1, np.inf)
  assert got["c"][0] == (1, -np.inf)


def test_values_are_readable_before_close(tmp_path):
  logdir = os.fspath(tmp_path)
  log = event_log.EventLog(logdir)
  log.scalars(7, {"x": 3.0})
  log.flush()
  assert event_log.read_scalars(logdir) == {"x": [(7, 3.0)]}
  log.close()
  log.close()  # idempotent
  log.scalars(8, {"x": 4.0})  # closed: a no-op
  assert event_log.read_scalars(logdir) == {"x": [(7, 3.0)]}


def test_resume_hides_the_steps_trained_again(tmp_path):
  logdir = os.fspath(tmp_path)
  with event_log.EventLog(logdir) as log:
    for s in range(1, 6):
      log.scalars(s, {"loss": float(s)})
  # Restored from the checkpoint at step 3: steps 4 and 5 run again.
  with event_log.EventLog(logdir, resume_step=3) as log:
    for s in (4, 5, 6):
      log.scalars(s, {"loss": 10.0 * s})
  assert len(_event_files(logdir)) == 2  # same second, distinct files
  assert event_log.read_scalars(logdir) == {
      "loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]}


def test_readable_by_tensorboard_if_installed(tmp_path):
  loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  logdir = os.fspath(tmp_path)
  with event_log.EventLog(logdir) as log:
    log.scalars(3, {"loss": 0.25})
  (path,) = _event_files(logdir)
  values = [(e.step, v.tag, v.simple_value)
            for e in loader.LegacyEventFileLoader(path).Load() for v in e.summary.value]
  assert values == [(3, "loss", 0.25)]


def test_a_torn_last_record_is_ignored(tmp_path):
  logdir = os.fspath(tmp_path)
  with event_log.EventLog(logdir) as log:
    log.scalars(1, {"x": 1.0})
    log.scalars(2, {"x": 2.0})
  (path,) = _event_files(logdir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 3)  # a kill in the middle of a write
  assert event_log.read_scalars(logdir) == {"x": [(1, 1.0)]}


def test_a_value_that_is_not_one_number_is_refused(tmp_path):
  with event_log.EventLog(os.fspath(tmp_path)) as log:
    with pytest.raises(ValueError, match="'images'"):
      log.scalars(1, {"images": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="'name'"):
      log.scalars(1, {"name": "gan"})


def test_disabled_needs_nothing_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
  logdir = os.fspath(tmp_path / "events")
  with event_log.EventLog(logdir, enabled=False) as log:
    log.scalars(1, {"x": 1.0})
    log.flush()
  assert not os.path.exists(logdir)


def test_enabled_without_tensorboardx_is_one_user_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(UserError) as e:
    event_log.EventLog(os.fspath(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert "pip install 'tensorboardX>=2.6,<3'" in message
