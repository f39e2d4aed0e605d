"""Faults, for real: damaged checkpoints, writes that fail, a run made longer, a preparation killed.

Real Orbax checkpoints, real processes and files. Writes fail through the
filesystem (a read-only directory) or an OSError injected below Orbax (at
`os.mkdir`, where Orbax makes a step's directory), never a mock of Orbax.
As root, chmod does not stop writes: the read-only tests then run the CLI
with CAP_DAC_OVERRIDE dropped (`setpriv`), or are skipped saying so.
"""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from agcg_jax import checkpoint as ckpt_lib
from agcg_jax import config as config_lib
from agcg_jax import state as S
from agcg_jax import train
from agcg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "demo.py") + ":tiny"
FIXTURE_NIH = os.path.join(ROOT, "tests", "fixtures", "nih")
# A failed save once left Orbax's writer threads waiting 5 minutes for a
# signal before the process could exit: a failing write must also be quick.
TIMELY = 200


def agcg(*args, prefix=(), timeout=600):
  return subprocess.run([*prefix, sys.executable, "-m", "agcg_jax.cli", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def stderr_lines(proc) -> list[str]:
  """stderr without progress bars (tqdm redraws with carriage returns)."""
  lines = []
  for line in proc.stderr.replace("\r", "\n").splitlines():
    if line.strip() and not line.lstrip().startswith(("gan:", "classifier:", "ctr:", "evaluate:")):
      lines.append(line)
  return lines


def damage(paths):
  """Overwrites files with junk of the same size (a bad disk, a bad copy)."""
  rng = np.random.default_rng(0)
  for p in paths:
    size = max(os.path.getsize(p), 16)
    with open(p, "wb") as f:
      f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
  assert paths


def data_files(step_dir):
  """The array data files of a checkpoint step (OCDBT data under state/)."""
  return sorted(p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
                if os.path.isfile(p))


def tree_of(directory):
  """{relative path: bytes} of every file under directory."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished tiny run (classifier, CTR, GAN at 6 steps with checkpoints at 3 and 6).

  Trained in this process as `agcg demo` would (same config, same devices),
  without its evaluation.
  """
  from agcg_jax import commands  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("finished"))
  config = config_lib.load_config(TINY)
  commands.prepare(config, workdir)
  for fn in (train.train_classifier, train.train_ctr, train.train_gan):
    assert fn(config, workdir, progress=False)[1] == "done"
  assert sorted(os.listdir(os.path.join(workdir, "gan", "checkpoints"))) == ["3", "6"]
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(finished_run, dst)
  return dst


def tiny(*overrides):
  """The tiny config as the finished run was trained with it (data in <workdir>/data)."""
  return config_lib.apply_overrides(config_lib.load_config(TINY), overrides)


def gan_params(workdir, config):
  params, step = ckpt_lib.restore_params(workdir, "gan", S.gan_init_fn(config))
  return jax.device_get(params), step


def metric_steps(workdir, stage="gan"):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


# ------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
def test_damaged_newest_checkpoint_evaluate_and_train_fall_back_in_one_line(run_copy, tmp_path):
  ckpts = os.path.join(run_copy, "gan", "checkpoints")
  damage(data_files(os.path.join(ckpts, "6")))
  damaged = tree_of(os.path.join(ckpts, "6"))
  other = str(tmp_path / "other")
  shutil.copytree(run_copy, other)

  proc = agcg("evaluate", "--config", TINY, "--workdir", run_copy)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  named = [l for l in stderr_lines(proc) if "checkpoints/6" in l]
  assert len(named) == 1 and stderr_lines(proc) == named, stderr_lines(proc)
  assert named[0].startswith(f"agcg: warning: checkpoint {ckpts}/6 is damaged (")
  assert named[0].endswith("; using step 3"), named[0]
  # Moved aside, not deleted; Orbax no longer sees it.
  moved = [n for n in os.listdir(ckpts) if n.startswith("6" + ckpt_lib.DAMAGED_TAG)]
  assert sorted(os.listdir(ckpts)) == ["3", moved[0]]
  assert tree_of(os.path.join(ckpts, moved[0])) == damaged
  assert json.load(open(os.path.join(run_copy, "metrics.json")))["num_test"] == 16
  prefix = unprivileged_prefix(tmp_path, skip=False)
  if prefix is not None:  # the report of a read-only workdir: one line, nothing half-written
    read_only(*[b for b, _, _ in os.walk(run_copy)])
    try:
      proc = agcg("explain", "--config", TINY, "--workdir", run_copy, prefix=prefix, timeout=TIMELY)
    finally:
      writable(run_copy)
    assert_one_error_line(proc, "explain: Permission denied: ", "untouched")
    assert not os.path.exists(os.path.join(run_copy, "report.html"))

  proc = agcg("train-gan", "--config", TINY, "--workdir", other)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = stderr_lines(proc)
  assert len(lines) == 1, lines
  assert "checkpoints/6 is damaged" in lines[0] and "using step 3" in lines[0], lines
  assert "resuming from step 3 of 6" in proc.stdout
  # Steps 4..6 were trained again: a readable 6, the log one run without repeats.
  assert metric_steps(other) == [2, 4, 6]
  assert gan_params(other, tiny())[1] == 6
  other_ckpts = os.listdir(os.path.join(other, "gan", "checkpoints"))
  assert any(n.startswith("6" + ckpt_lib.DAMAGED_TAG) for n in other_ckpts), other_ckpts


@pytest.mark.slow  # the finished run
def test_every_file_damaged_is_damage_not_other_networks(run_copy, capfd):
  ckpts = os.path.join(run_copy, "gan", "checkpoints")
  every = [os.path.join(b, n) for b, _, fs in os.walk(os.path.join(ckpts, "6")) for n in fs]
  damage(every)
  config = tiny()
  capfd.readouterr()
  _, step = gan_params(run_copy, config)
  err = capfd.readouterr().err
  assert step == 3
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and f"{ckpts}/6 is damaged" in lines[0] and "using step 3" in lines[0], err


@pytest.mark.slow  # the finished run
def test_strict_refuses_and_none_readable_is_one_error(run_copy, monkeypatch, capfd):
  ckpts = os.path.join(run_copy, "gan", "checkpoints")
  config = tiny()
  damage(data_files(os.path.join(ckpts, "6")))
  monkeypatch.setenv(ckpt_lib.STRICT_ENV, "1")
  with pytest.raises(UserError, match=r"checkpoints/6 is damaged .*AGCG_STRICT_CHECKPOINTS=1"):
    gan_params(run_copy, config)
  assert sorted(os.listdir(ckpts)) == ["3", "6"]  # strict moves nothing
  monkeypatch.delenv(ckpt_lib.STRICT_ENV)
  damage(data_files(os.path.join(ckpts, "3")))
  with pytest.raises(UserError, match=r"no readable checkpoint in .*: step\(s\) 6, 3 cannot be read"):
    gan_params(run_copy, config)
  assert sorted(os.listdir(ckpts)) == ["3", "6"]  # nothing readable: nothing moved
  assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow  # the finished run
def test_other_networks_are_still_named_as_such(run_copy):
  os.remove(os.path.join(run_copy, "gan", "config.json"))  # only the checkpoint can tell
  wider = tiny("model.gen_width=8")
  with pytest.raises(UserError, match=r"does not match the config's networks \(params\.gen_"):
    gan_params(run_copy, wider)
  assert sorted(os.listdir(os.path.join(run_copy, "gan", "checkpoints"))) == ["3", "6"]


# ------------------------------------------------------------------ failing writes


@pytest.mark.slow
@pytest.mark.parametrize("target", ["checkpoint", "metrics"])
def test_injected_enospc_stops_in_one_line_and_keeps_earlier_checkpoints(run_copy, monkeypatch, target):
  """Continue the finished run to 12 steps; the write at step 9 fails with ENOSPC."""
  config = tiny("gan.steps=12")
  ckpts = os.path.join(run_copy, "gan", "checkpoints")
  before = tree_of(ckpts)
  enospc = lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(p))
  if target == "checkpoint":
    real_mkdir = os.mkdir

    def mkdir(path, *a, **k):  # where Orbax makes <step>.orbax-checkpoint-tmp
      if os.path.basename(os.fspath(path)).startswith("9."):
        raise enospc(path)
      return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", mkdir)
    expected = (re.escape(f"cannot write {ckpts}/9 (No space left on device); ")
                + "the last complete checkpoint is step 6")
  else:
    real_write = train.MetricsLog.write

    def write(self, row):
      if row["step"] >= 8:
        raise enospc(self.path)
      real_write(self, row)
    monkeypatch.setattr(train.MetricsLog, "write", write)
    expected = (re.escape(f"cannot write {run_copy}/gan/metrics.jsonl (No space left on device); ")
                + "the last complete checkpoint is step 6")
  with pytest.raises(ckpt_lib.WriteError, match=expected):
    train.train_gan(config, run_copy, progress=False)
  after = tree_of(ckpts)
  assert {k: v for k, v in after.items() if k in before} == before  # 3 and 6 untouched
  assert sorted(os.listdir(ckpts)) == ["3", "6"]  # no half-written step under a step's name
  assert gan_params(run_copy, config)[1] == 6


def unprivileged_prefix(tmp_path, skip=True) -> list[str] | None:
  """A command prefix under which a 0o555 directory refuses writes, or skip (None)."""
  probe = tmp_path / "probe"
  probe.mkdir(exist_ok=True)
  probe.chmod(0o555)
  try:
    prefixes = [[]]
    if os.geteuid() == 0 and shutil.which("setpriv"):
      prefixes.append(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"])
    for i, prefix in enumerate(prefixes):
      proc = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe / str(i))!r}, 'w')"],
                            capture_output=True, text=True)
      if proc.returncode != 0 and "PermissionError" in proc.stderr:
        return prefix
  finally:
    probe.chmod(0o755)
  if not skip:
    return None
  pytest.skip("a read-only directory cannot be made here (root without setpriv): see the "
              "injected-ENOSPC test")


def read_only(*dirs):
  for d in dirs:
    os.chmod(d, 0o555)


def writable(root):
  for base, subdirs, _ in os.walk(root):
    os.chmod(base, 0o755)


def assert_one_error_line(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = stderr_lines(proc)
  assert len(lines) == 1 and lines[0].startswith("agcg: error: "), lines
  for n in needles:
    assert n in lines[0], lines[0]


@pytest.mark.slow
def test_read_only_workdir_and_checkpoints_dir_stop_in_one_line(run_copy, tmp_path):
  prefix = unprivileged_prefix(tmp_path)
  ckpts = os.path.join(run_copy, "gan", "checkpoints")
  before = tree_of(ckpts)
  # The whole workdir read-only: the first write (the longer run's config record) fails.
  read_only(*[b for b, _, _ in os.walk(run_copy)])
  try:
    proc = agcg("train-gan", "--config", TINY, "--workdir", run_copy, "--config.gan.steps=8",
                prefix=prefix, timeout=TIMELY)
    assert_one_error_line(proc, f"cannot write {run_copy}/gan/config.json", "Permission denied",
                          "the last complete checkpoint is step 6")
    # A finished run needs no write to be looked at again: same command, same steps.
    proc = agcg("train-gan", "--config", TINY, "--workdir", run_copy, prefix=prefix, timeout=TIMELY)
    assert proc.returncode == 0, proc.stderr[-3000:]
  finally:
    writable(run_copy)
  # Only the checkpoints read-only: two steps are trained, the save at 8 fails.
  read_only(ckpts)
  try:
    proc = agcg("train-gan", "--config", TINY, "--workdir", run_copy, "--config.gan.steps=8",
                prefix=prefix, timeout=TIMELY)
  finally:
    writable(run_copy)
  assert_one_error_line(proc, f"cannot write {ckpts}/8 (Permission denied)",
                        "the last complete checkpoint is step 6")
  assert tree_of(ckpts) == before
  assert gan_params(run_copy, tiny())[1] == 6


# ------------------------------------------------------------------ training longer


@pytest.mark.slow
def test_train_gan_with_more_steps_continues_the_finished_run(finished_run, run_copy):
  proc = agcg("train-gan", "--config", TINY, "--workdir", run_copy, "--config.gan.steps=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "gan.steps: 6 -> 10" in proc.stdout and "resuming from step 6 of 10" in proc.stdout
  assert metric_steps(run_copy) == [2, 4, 6, 8, 10]
  with open(os.path.join(run_copy, "gan", "config.json")) as f:
    assert json.load(f)["gan"]["steps"] == 10
  config = tiny("gan.steps=10")
  (p6, s6), (p10, s10) = gan_params(finished_run, config), gan_params(run_copy, config)
  assert (s6, s10) == (6, 10)
  # The schedule is re-planned for 10 steps (decay from 5 to 10), so steps 7..10
  # train at 0.8..0.2 of the rates: had the 6-step plan (0 from step 6) been
  # kept, the generators would not move.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p6["gen_cardiomegaly"],
                       p10["gen_cardiomegaly"])
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_extended_before_its_decay_a_run_equals_the_longer_run(data_dir, tmp_path, one_device_mesh):
  """Constant rates (decay_start=1): 3 steps then 6 is bit-for-bit a straight 6."""
  data = data_dir
  short, straight = str(tmp_path / "short"), str(tmp_path / "straight")
  conf = lambda steps: config_lib.apply_overrides(config_lib.load_config(TINY), [
      f"data.dir={data}", "gan.decay_start=1.0", f"gan.steps={steps}"])
  train.train_gan(conf(3), short, one_device_mesh, progress=False)
  train.train_gan(conf(6), short, one_device_mesh, progress=False)
  train.train_gan(conf(6), straight, one_device_mesh, progress=False)
  (a, sa), (b, sb) = gan_params(short, conf(6)), gan_params(straight, conf(6))
  assert sa == sb == 6
  chex.assert_trees_all_equal(a, b)
  assert metric_steps(short) == [2, 3, 4, 6]  # 3: the end of the first, shorter plan
  assert metric_steps(straight) == [2, 4, 6]


def test_what_changes_the_networks_or_the_data_is_still_refused(tmp_path):
  run_copy = str(tmp_path)
  for stage in ("classifier", "ctr", "gan"):  # the records of a 6-step run of each stage
    train._record_stage_config(tiny(), run_copy, stage)
  for override in ("model.gen_width=8", "data.num_train=64", "gan.lr_g=0.001", "seed=1"):
    with pytest.raises(UserError, match="holds a run of another config"):
      train._record_stage_config(tiny(override), run_copy, "gan")
  with pytest.raises(UserError, match=r"differs in gan\.steps"):  # shorter: refused
    train._record_stage_config(tiny("gan.steps=4"), run_copy, "gan")
  with open(os.path.join(run_copy, "gan", "config.json")) as f:
    assert json.load(f)["gan"]["steps"] == 6
  train._record_stage_config(tiny("gan.steps=9", "gan.log_every=3"), run_copy, "gan")
  with open(os.path.join(run_copy, "gan", "config.json")) as f:
    recorded = json.load(f)["gan"]
  assert (recorded["steps"], recorded["log_every"]) == (9, 3)
  for stage in ("classifier", "ctr"):  # the same for the other stages
    train._record_stage_config(tiny(f"{stage}.steps=9"), run_copy, stage)
    with open(os.path.join(run_copy, stage, "config.json")) as f:
      assert json.load(f)[stage]["steps"] == 9
    with pytest.raises(UserError, match=rf"differs in {stage}\.lr"):
      train._record_stage_config(tiny(f"{stage}.steps=9", f"{stage}.lr=0.5"), run_copy,
                                 stage)


def _record_without(run_copy, stage, section, fields):
  """A stage record as an older version wrote it: without `fields` of `section`. Returns its path."""
  train._record_stage_config(tiny(), run_copy, stage)
  path = os.path.join(run_copy, stage, "config.json")
  with open(path) as f:
    record = json.load(f)
  for field in fields:
    del record[section][field]
  with open(path, "w") as f:
    json.dump(record, f)
  return path


def test_a_record_from_before_a_new_field_resumes_only_at_its_default(tmp_path):
  """A run recorded before gan.attention_prior_* existed resumes; a non-default value is refused."""
  run_copy = str(tmp_path)
  _record_without(run_copy, "gan", "gan", ("attention_prior_start", "attention_prior_ramp"))
  train._record_stage_config(tiny(), run_copy, "gan")  # the defaults: the same run
  with pytest.raises(UserError, match=r"differs in gan\.attention_prior_ramp"):
    train._record_stage_config(tiny("gan.attention_prior_ramp=0.5", "gan.attention_prior_start=0.3"),
                               run_copy, "gan")


# ------------------------------------------------------------ interrupted preparation


def read_records(version_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(version_dir).as_data_source(split)
  return [source[i] for i in range(len(source))]


def assert_same_records(a_dir, b_dir, splits=("train", "test")):
  for split in splits:
    a, b = read_records(a_dir, split), read_records(b_dir, split)
    assert len(a) == len(b) > 0, split
    for ra, rb in zip(a, b):
      assert sorted(ra) == sorted(rb)
      for k in ra:
        np.testing.assert_array_equal(np.asarray(ra[k]), np.asarray(rb[k]), err_msg=f"{split} {k}")


def start(tmp_path, *args):
  log = open(tmp_path / "killed.log", "w")
  return subprocess.Popen([sys.executable, "-m", "agcg_jax.cli", *args], cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)


def kill_when(proc, ready, tmp_path, timeout=300):
  """SIGKILLs `proc` as soon as ready() holds; fails if it finished first."""
  t0 = time.time()
  while not ready():
    if proc.poll() is not None:
      pytest.fail("finished before it could be interrupted: "
                  + (tmp_path / "killed.log").read_text()[-2000:])
    assert time.time() - t0 < timeout
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_prepare_phantoms_killed_while_writing_then_rerun_equals_a_clean_build(tmp_path):
  from agcg_jax.data import pipeline, tfds_phantoms
  # Train is written first; the kill lands while the test split is generated.
  sizes = ["--config.data.num_train=100", "--config.data.num_test=500"]
  killed = str(tmp_path / "killed")
  proc = start(tmp_path, "prepare-phantoms", "--config", TINY, "--workdir", killed, *sizes)
  partial = lambda: glob.glob(os.path.join(killed, "data", "phantom_chest_xray", "*", "incomplete*",
                                           "*.array_record*"))
  kill_when(proc, lambda: bool(partial()), tmp_path)
  assert not glob.glob(os.path.join(killed, "data", "*", "*", "*", "dataset_info.json"))
  proc = agcg("prepare-phantoms", "--config", TINY, "--workdir", killed, *sizes)
  assert proc.returncode == 0, proc.stderr[-3000:]
  version = proc.stdout.strip().rsplit(" ", 1)[-1]
  assert pipeline.find_dataset_dir(os.path.join(killed, "data")) == version  # what training opens
  clean = tfds_phantoms.prepare_phantoms(str(tmp_path / "clean"), size=32, num_train=100,
                                         num_test=500, seed=0)
  assert_same_records(version, clean)


def big_nih_download(dst, side=768):
  """The fixture with every absent image of its label file present (slow to convert on purpose).

  The 14 fixture images are upscaled once and hard-linked under the other
  names: a download where each conversion takes milliseconds, not microseconds.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  shutil.copytree(FIXTURE_NIH, dst, ignore=shutil.ignore_patterns("*.png"))
  images = os.path.join(dst, "images")
  os.makedirs(images, exist_ok=True)
  sources = []
  for name in sorted(os.listdir(os.path.join(FIXTURE_NIH, "images"))):
    with Image.open(os.path.join(FIXTURE_NIH, "images", name)) as im:
      im.resize((side, side)).save(os.path.join(images, name))
    sources.append(os.path.join(images, name))
  with open(os.path.join(dst, "Data_Entry_2017_v2020.csv")) as f:
    names = [line.split(",", 1)[0] for line in f.readlines()[1:]]
  for i, name in enumerate(n for n in names if not os.path.exists(os.path.join(images, n))):
    os.link(sources[i % len(sources)], os.path.join(images, name))
  return dst


@pytest.mark.slow
def test_prepare_nih_killed_while_converting_then_rerun_equals_a_clean_build(tmp_path):
  from agcg_jax.data import nih
  from agcg_jax.data import tfds_nih
  download = big_nih_download(str(tmp_path / "nih"))
  killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
  args = ["--data-dir", download, "--size", "32", "--workers", "1"]
  proc = start(tmp_path, "prepare-nih", *args, "--out", killed)
  cache = os.path.join(killed, "cache", "size32")
  converted = lambda: [n for n in os.listdir(cache) if n.endswith(".png") and not n.startswith(".")]
  kill_when(proc, lambda: os.path.isdir(cache) and len(converted()) >= 20, tmp_path)
  assert not os.path.exists(os.path.join(killed, "cohort.json"))
  proc = agcg("prepare-nih", *args, "--out", killed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(killed, "cohort.json")) as f:
    again = json.load(f)
  assert again["cache"]["reused"] >= 19  # the killed run's conversions were kept
  fresh = tfds_nih.prepare_nih(download, clean, size=32, workers=1)
  assert again["fingerprint"] == fresh["fingerprint"]
  assert_same_records(again["tfds_dir"], fresh["tfds_dir"], nih.SPLIT_NAMES)


def test_orbax_echoes_after_a_failed_read_are_dropped_and_others_kept():
  """After a failed read, the never-awaited Orbax coroutines of the same checkpoint
  raise one 'Exception ignored' each (hundreds on a demo-size checkpoint): dropped.
  An unraisable exception from anywhere else is still printed. (A fresh
  interpreter: pytest replaces sys.unraisablehook inside tests.)"""
  code = textwrap.dedent("""
      import os, sys, types
      from agcg_jax import checkpoint as ckpt_lib

      def unraisable(filename, text):
        # An object whose __del__ raises: Python hands the error to sys.unraisablehook,
        # with a traceback through `filename`.
        ns = {}
        src = f"class Boom:\\n  def __del__(self):\\n    raise Exception({text!r})\\n"
        exec(compile(src, filename, "exec"), ns)
        ns["Boom"]()
      ckpt_lib._drop_aftermath()  # what a failed read does
      unraisable(os.path.join(os.sep, "x", "orbax", "serialization.py"), "ECHO")
      unraisable(os.path.join(os.sep, "x", "elsewhere.py"), "OTHER")
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "ECHO" not in proc.stderr
  assert "OTHER" in proc.stderr


def test_a_classifier_recorded_before_cls_norm_resumes_only_with_the_norm(tmp_path):
  """model.cls_norm came later: an older classifier record resumes at 'instance', not at 'none'."""
  run_copy = str(tmp_path)
  path = _record_without(run_copy, "classifier", "model", ("cls_norm",))
  train._record_stage_config(tiny(), run_copy, "classifier")
  with open(path) as f:
    assert json.load(f)["model"]["cls_norm"] == "instance"
  with pytest.raises(UserError, match=r"differs in model\.cls_norm"):
    train._record_stage_config(tiny("model.cls_norm=none"), run_copy, "classifier")
