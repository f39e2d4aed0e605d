"""Training loops: checkpoint, restore and continue equals training straight through."""
import json
import os

import chex
import jax
import numpy as np
import pytest

from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import config as config_lib
from agcg_jax import sharding
from agcg_jax import train
from agcg_jax.errors import UserError


def _config(tiny_config, data_dir):
  return config_lib.apply_overrides(tiny_config, [f"data.dir={data_dir}", "gan.ckpt_every=2",
                                                  "gan.log_every=1"])


def _params(workdir, config):
  from agcg_jax import state as S
  params, step = ckpt_lib.restore_params(workdir, "gan", S.gan_init_fn(config))
  return jax.device_get(params), step


def test_checkpoint_restore_continue_equals_straight_through(tiny_config, data_dir, tmp_path,
                                                             one_device_mesh):
  config = _config(tiny_config, data_dir)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  mesh = one_device_mesh
  train.run_stage(train.gan_stage(config, straight, mesh), straight, mesh, progress=False)
  # The same run, stopped after 3 of its 6 steps (the stage object's total),
  # then continued by a fresh stage from the checkpoint in the workdir.
  first = train.gan_stage(config, resumed, mesh)
  first.total_steps = 3
  train.run_stage(first, resumed, mesh, progress=False)
  assert _params(resumed, config)[1] == 3
  train.run_stage(train.gan_stage(config, resumed, mesh), resumed, mesh, progress=False)
  (p_straight, s1), (p_resumed, s2) = _params(straight, config), _params(resumed, config)
  assert s1 == s2 == 6
  chex.assert_trees_all_equal(p_straight, p_resumed)
  # The metrics file reads as one run: steps 1..6 once each, same values.
  rows = lambda w: [json.loads(l) for l in open(os.path.join(w, "gan", "metrics.jsonl"))]
  assert [r["step"] for r in rows(resumed)] == list(range(1, 7))
  for a, b in zip(rows(straight), rows(resumed)):
    assert a["g_loss"] == b["g_loss"] and a["d_loss"] == b["d_loss"]


def test_resume_drops_metrics_logged_after_the_last_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for s in range(1, 6):
      f.write(json.dumps({"step": s}) + "\n")
    f.write('{"step": 6, "g_lo')  # cut short by a kill
  train.MetricsLog(path, resume_step=4, enabled=True)
  assert [json.loads(l)["step"] for l in open(path)] == [1, 2, 3, 4]


def test_non_finite_loss_stops_with_a_clear_message():
  with pytest.raises(UserError, match="non-finite g_loss at step 7"):
    train._check_finite({"g_loss": np.float32("nan"), "d_loss": np.float32(1.0)}, 7, "gan")


def test_first_ctrl_c_requests_a_stop_and_a_second_interrupts():
  import signal
  import threading
  import time
  # Signal handlers live in the main thread; pytest (and xdist workers) run tests there.
  assert threading.current_thread() is threading.main_thread()
  with train.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.requested
  with train.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)


def test_each_stage_has_its_own_random_streams():
  keys = {s: train.stage_key(0, s) for s in ("classifier", "gan", "ctr")}
  data = {jax.random.key_data(k).tobytes() for k in keys.values()}
  assert len(data) == 3
  assert jax.random.key_data(train.stage_key(0, "gan")).tobytes() == \
      jax.random.key_data(train.stage_key(0, "gan")).tobytes()
  assert jax.random.key_data(train.stage_key(1, "gan")).tobytes() != \
      jax.random.key_data(train.stage_key(0, "gan")).tobytes()
  seeds = [train.stage_seed(0, s) for s in ("classifier", "gan", "ctr")]
  assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)


def test_gan_replicate_changes_only_the_gan_streams(tiny_config):
  """gan.replicate gives the GAN another init and data order; 0 is the run's own streams."""
  kd = lambda k: jax.random.key_data(k).tobytes()
  assert kd(train.stage_key(0, "gan", 0)) == kd(train.stage_key(0, "gan"))
  assert kd(train.stage_key(0, "gan", 1)) != kd(train.stage_key(0, "gan"))
  assert train.stage_seed(0, "gan", 0) == train.stage_seed(0, "gan")
  assert train.stage_seed(0, "gan", 1) != train.stage_seed(0, "gan")
  c = tiny_config.copy_and_resolve_references()
  c.gan.replicate = 2
  mesh = sharding.data_mesh()
  gan, cls = train.gan_stage(c, None, mesh), train.classifier_stage(c, None, mesh)
  assert gan.replicate == 2 and cls.replicate == 0
  assert kd(train.compile_stage(gan, mesh).key) == kd(train.stage_key(c.seed, "gan", 2))
