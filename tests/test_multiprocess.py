"""Real processes: two JAX processes over localhost, SIGTERM and SIGKILL with resume.

Each test starts `agcg` subprocesses (real jax.distributed with CPU gloo
collectives, real signals) on the tiny config.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import config as config_lib
from agcg_jax import state as S
from agcg_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "demo.py") + ":tiny"
pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _cmd(command, workdir, data_dir, *overrides):
  return [sys.executable, "-m", "agcg_jax.cli", command, "--config", TINY, "--workdir", workdir,
          f"--config.data.dir={data_dir}", *overrides]


def _launch(command, workdir, data_dir, *overrides, devices, num, ids=None, timeout_s=60,
            nums=None):
  """Starts processes `ids` (default all) of a `num`-process run of `agcg command`."""
  return _launch_cli(command, workdir, f"--config.data.dir={data_dir}", *overrides, devices=devices,
                     num=num, ids=ids, timeout_s=timeout_s, nums=nums)


def _launch_cli(command, workdir, *overrides, devices, num, ids=None, timeout_s=60, nums=None):
  """`_launch` with every override given (no data.dir of the tiny phantoms)."""
  port = _free_port()
  ids = range(num) if ids is None else ids
  cmd = [sys.executable, "-m", "agcg_jax.cli", command, "--config", TINY, "--workdir", workdir,
         *overrides]
  return [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=_env(devices, AGCG_DISTRIBUTED=1, AGCG_COORDINATOR=f"127.0.0.1:{port}",
                                    AGCG_NUM_PROCESSES=num if nums is None else nums[i],
                                    AGCG_PROCESS_ID=i, AGCG_INIT_TIMEOUT=timeout_s))
          for i in ids]


def _final_params(workdir, tiny_config, data_dir):
  config = config_lib.apply_overrides(tiny_config, [f"data.dir={data_dir}"])
  params, step = ckpt_lib.restore_params(workdir, "gan", S.gan_init_fn(config))
  return jax.device_get(params), step


def _steps_logged(workdir):
  path = os.path.join(workdir, "gan", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  for line in open(path):
    try:
      out.append(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError):
      pass
  return out


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_devices(tmp_path, data_dir, tiny_config):
  one = str(tmp_path / "one")
  proc = subprocess.run(_cmd("train-gan", one, data_dir), env=_env(4), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = str(tmp_path / "two")
  procs = _launch("train-gan", two, data_dir, devices=2, num=2)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  p1, s1 = _final_params(one, tiny_config, data_dir)
  p2, s2 = _final_params(two, tiny_config, data_dir)
  assert s1 == s2 == tiny_config.gan.steps
  # Same global batches (the data order does not depend on the process
  # count) and the same 4-way sharded step, so each network's update (final
  # minus initial parameters) must agree up to the rounding of the
  # cross-process reduction. Adam turns that rounding into whole-lr moves of
  # parameters whose gradient is near zero, so single elements may differ by
  # a sizeable part of the update; the RMS over a network may not. Tolerance:
  # RMS difference <= lr/4 (measured <= 0.06 lr for G and A, 0.007 lr for D),
  # and every network, G and A included, moved by at least 10 times that
  # (measured 3.6-4.3 lr), so a G or A update that differs between the two
  # runs by more than a fifteenth of its size fails.
  g = tiny_config.gan
  lr = {"gen": g.lr_g, "att": g.lr_a, "dis": g.lr_d}
  p0 = jax.device_get(jax.jit(S.gan_init_fn(tiny_config))(
      train.stage_key(tiny_config.seed, "gan")).params)
  rms = lambda leaves: float(np.sqrt(np.mean(np.concatenate([np.ravel(x) ** 2 for x in leaves]))))
  assert sorted(p0) == sorted(S.GAN_NETS)
  for name in S.GAN_NETS:
    u1 = [a - b for a, b in zip(jax.tree.leaves(p1[name]), jax.tree.leaves(p0[name]))]
    u2 = [a - b for a, b in zip(jax.tree.leaves(p2[name]), jax.tree.leaves(p0[name]))]
    tol = 0.25 * lr[name.split("_")[0]]
    diff = rms([a - b for a, b in zip(u1, u2)])
    assert diff <= tol, (name, diff / tol)
    # Moved by much more than the tolerance (and by no more than Adam can in
    # `steps` steps, so p0 is the run's initial state).
    assert 10 * tol <= rms(u1) <= 8 * tol * g.steps, (name, rms(u1) / tol)
  # Only process 0 wrote the metrics file, once per logged step.
  assert _steps_logged(two) == list(range(2, tiny_config.gan.steps + 1, 2))


@pytest.mark.slow
def test_two_processes_evaluate_the_whole_test_set_like_one(tmp_path, data_dir):
  run = str(tmp_path / "run")
  for command in ("train-classifier", "train-ctr", "train-gan"):
    proc = subprocess.run(_cmd(command, run, data_dir), env=_env(4), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  metrics_path = os.path.join(run, "metrics.json")
  proc = subprocess.run(_cmd("evaluate", run, data_dir), env=_env(4), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = json.load(open(metrics_path))
  os.remove(metrics_path)
  procs = _launch("evaluate", run, data_dir, devices=2, num=2)
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = json.load(open(metrics_path))
  # Each process scored its half; the numbers are those of the whole test set.
  assert one["num_test"] == two["num_test"] == 16
  for k in ("confusion_original", "confusion_translated", "flip_rate", "flip_rate_by_class"):
    assert one[k] == two[k], k
  for k in ("accuracy_original", "accuracy_translated", "ctr_direction_correct",
            "attention_truth_enrichment", "cam_truth_enrichment", "counterfactual_error",
            "ctr_direction_correct_model_free", "cam_attention_pearson", "ctr_regressor_mae"):
    np.testing.assert_allclose(one[k], two[k], rtol=1e-4, err_msg=k)


def _wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process ended early: {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError("timed out")


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly_and_sigkill_resumes_from_last_checkpoint(
    tmp_path, data_dir, tiny_config):
  overrides = ["--config.gan.steps=40", "--config.gan.ckpt_every=10", "--config.gan.log_every=1"]
  straight = str(tmp_path / "straight")
  proc = subprocess.run(_cmd("train-gan", straight, data_dir, *overrides), env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # SIGTERM in the middle: a checkpoint at the step it stopped, a clean exit.
  stopped = str(tmp_path / "stopped")
  p = subprocess.Popen(_cmd("train-gan", stopped, data_dir, *overrides), env=_env(8), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: len(_steps_logged(stopped)) >= 3, p)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert "stopped by a signal at step" in out
  stop_step = int(out.split("stopped by a signal at step ")[1].split(";")[0])
  assert 3 <= stop_step < 40
  # SIGKILL after that: the resumed run restarts from the last complete checkpoint.
  p = subprocess.Popen(_cmd("train-gan", stopped, data_dir, *overrides), env=_env(8), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpt_dir = os.path.join(stopped, "gan", "checkpoints")
  complete = lambda: [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]  # (finalised names only)
  # Killed once a checkpoint after the stop is complete (saving is asynchronous: on a slow
  # machine the step-10 save may still be in flight when step 16 is logged).
  _wait_for(lambda: max(_steps_logged(stopped) or [0]) >= min(stop_step + 12, 39)
            and max(complete()) > stop_step, p)
  p.kill()
  out, _ = p.communicate(timeout=60)
  assert f"resuming from step {stop_step} of 40" in out
  last_complete = max(complete())
  proc = subprocess.run(_cmd("train-gan", stopped, data_dir, *overrides), env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed_from = int(proc.stdout.split("resuming from step ")[1].split()[0])
  assert resumed_from == last_complete > stop_step
  # The metrics file reads as one run, and the parameters equal the run never stopped.
  assert _steps_logged(stopped) == list(range(1, 41))
  config = config_lib.apply_overrides(tiny_config, [f"data.dir={data_dir}", "gan.steps=40"])
  a, _ = ckpt_lib.restore_params(straight, "gan", S.gan_init_fn(config))
  b, _ = ckpt_lib.restore_params(stopped, "gan", S.gan_init_fn(config))
  chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def _one_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("agcg: error: ")
  for n in needles:
    assert n in last, last


def test_unreachable_coordinator_is_a_clear_error_after_a_bounded_wait(tmp_path, data_dir):
  t0 = time.time()
  proc = subprocess.run(_cmd("train-gan", str(tmp_path), data_dir), cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env=_env(1, AGCG_DISTRIBUTED=1, AGCG_COORDINATOR=f"127.0.0.1:{_free_port()}",
                                 AGCG_NUM_PROCESSES=2, AGCG_PROCESS_ID=1, AGCG_INIT_TIMEOUT=5))
  _one_line(proc, "could not start the multi-process runtime", "127.0.0.1")
  assert time.time() - t0 < 120


def test_process_count_that_does_not_match_is_a_clear_error(tmp_path, data_dir):
  # Three processes announced, two started: both give up after the bounded wait.
  procs = _launch("train-gan", str(tmp_path), data_dir, devices=1, num=3, ids=range(2), timeout_s=6)
  for p in procs:
    _, err = p.communicate(timeout=120)
    _one_line(subprocess.CompletedProcess(p.args, p.returncode, "", err),
              "only 2 of AGCG_NUM_PROCESSES=3 processes")
  # Processes that disagree on the count: an immediate error on both.
  procs = _launch("train-gan", str(tmp_path), data_dir, devices=1, num=2, timeout_s=30, nums=[2, 3])
  for p in procs:
    _, err = p.communicate(timeout=120)
    _one_line(subprocess.CompletedProcess(p.args, p.returncode, "", err),
              "process 1 says AGCG_NUM_PROCESSES=3 but the coordinator (process 0) says 2")


def test_process_id_out_of_range_and_indivisible_global_batch(tmp_path, data_dir):
  proc = subprocess.run(_cmd("train-gan", str(tmp_path), data_dir), cwd=ROOT, capture_output=True,
                        text=True, timeout=120,
                        env=_env(1, AGCG_DISTRIBUTED=1, AGCG_COORDINATOR="127.0.0.1:1",
                                 AGCG_NUM_PROCESSES=2, AGCG_PROCESS_ID=3))
  _one_line(proc, "AGCG_PROCESS_ID=3")
  proc = subprocess.run(_cmd("train-gan", str(tmp_path / "b"), data_dir, "--config.gan.global_batch=3"),
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(8))
  _one_line(proc, "gan.global_batch=3", "8 devices")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_with_a_checkpoint(tmp_path, data_dir):
  """Preemption may reach one worker first: all processes must stop at the same step."""
  run = str(tmp_path / "run")
  overrides = ["--config.gan.steps=400", "--config.gan.log_every=1"]
  procs = _launch("train-gan", run, data_dir, *overrides, devices=2, num=2)
  _wait_for(lambda: len(_steps_logged(run)) >= 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stop_step = int(outs[0][0].split("stopped by a signal at step ")[1].split(";")[0])
  assert 3 <= stop_step < 400
  ckpts = [int(d) for d in os.listdir(os.path.join(run, "gan", "checkpoints")) if d.isdigit()]
  assert max(ckpts) == stop_step
