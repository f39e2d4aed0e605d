"""End to end through the real CLI: the whole chain on tiny settings, the notebook
on the finished run, and bad input answered with one line, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_notebook import _EXECUTE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "demo.py") + ":tiny"


def agcg(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "agcg_jax.cli", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  err = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert err and err[-1].startswith("agcg: error: "), proc.stderr[-2000:]
  for n in needles:
    assert n in err[-1], err[-1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  proc = agcg("demo", "--config", TINY, "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


@pytest.mark.slow
def test_demo_chain_writes_report_metrics_and_logs(tiny_run):
  workdir, proc = tiny_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  for key in ("accuracy_original", "accuracy_translated", "flip_rate", "attention_truth_enrichment",
              "cam_truth_enrichment", "prior_truth_enrichment", "attention_truth_pearson",
              "counterfactual_error", "ctr_direction_correct", "ctr_direction_correct_model_free",
              "cam_attention_pearson", "ctr_regressor_mae", "ruler_mae", "truth_support_share"):
    assert key in m and np.isfinite(m[key]), key
  assert m["cam_kind"] == "margin"
  assert 0.0 < m["truth_support_share"] < 0.5
  assert 0.0 <= m["accuracy_original"] <= 1.0
  assert np.sum(m["confusion_original"]) == m["num_test"] == 16
  assert m["class_names"] == ["No Finding", "Cardiomegaly"]
  html = open(os.path.join(workdir, "report.html")).read()
  assert "Cardiomegaly" in html and "figures/" in html
  for stage, steps in (("classifier", 6), ("gan", 6), ("ctr", 6)):
    rows = [json.loads(l) for l in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2)), stage
  assert "report:" in proc.stdout
  # Written to a file (not a terminal), progress is plain lines, not carriage-return floods.
  assert "\r" not in proc.stderr
  assert len((proc.stdout + proc.stderr).splitlines()) < 200


@pytest.mark.slow
def test_rerunning_the_finished_demo_resumes_instead_of_retraining(tiny_run):
  workdir, _ = tiny_run
  before = open(os.path.join(workdir, "gan", "metrics.jsonl")).read()
  proc = agcg("demo", "--config", TINY, "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert open(os.path.join(workdir, "gan", "metrics.jsonl")).read() == before


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_run(tiny_run, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "executed.ipynb"
  proc = subprocess.run(
      [sys.executable, "-c", _EXECUTE, os.path.join(ROOT, "notebooks", "explore_run.py"), str(out),
       os.path.join(ROOT, "notebooks")],
      env={**os.environ, "AGCG_WORKDIR": workdir}, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = [c for c in json.load(open(out))["cells"] if c["cell_type"] == "code"]
  outputs = [o for c in cells for o in c.get("outputs", [])]
  assert not [o for o in outputs if o["output_type"] == "error"]
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 3


@pytest.mark.slow
def test_workdir_of_another_config_is_refused(tiny_run):
  workdir, _ = tiny_run
  proc = agcg("train-gan", "--config", TINY, "--workdir", workdir, "--config.gan.lr_d=1e-3")
  assert_one_line_error(proc, "holds a run of another config", "gan.lr_d")


def test_unknown_config_key_is_one_line(tmp_path):
  proc = agcg("train-gan", "--config", TINY, "--workdir", str(tmp_path), "--config.gan.lr_x=1")
  assert_one_line_error(proc, "unknown config key 'gan.lr_x'")


def test_bad_config_value_and_missing_config_file(tmp_path):
  proc = agcg("train-gan", "--config", TINY, "--workdir", str(tmp_path), "--config.gan.steps=many")
  assert_one_line_error(proc, "gan.steps", "integer")
  proc = agcg("train-gan", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
  assert_one_line_error(proc, "nope.py")


def test_missing_dataset_is_one_line(tmp_path):
  missing = str(tmp_path / "no_data_here")
  proc = agcg("train-classifier", "--config", TINY, "--workdir", str(tmp_path / "run"),
              f"--config.data.dir={missing}")
  assert_one_line_error(proc, missing)


def test_evaluate_before_training_is_one_line(tmp_path):
  proc = agcg("evaluate", "--config", TINY, "--workdir", str(tmp_path))
  assert_one_line_error(proc, "train-classifier")


def test_help_says_what_it_does():
  proc = agcg("--help")
  assert proc.returncode == 0
  for cmd in ("prepare-phantoms", "prepare-nih", "train-classifier", "train-gan", "evaluate",
              "explain", "demo", "bench"):
    assert cmd in proc.stdout
  sub = agcg("train-gan", "--help")
  assert sub.returncode == 0 and "--config" in sub.stdout and "--workdir" in sub.stdout


@pytest.mark.slow
def test_explain_chosen_images(tiny_run):
  workdir, _ = tiny_run
  png = os.path.join(ROOT, "tests", "fixtures", "nih", "images")
  chosen = os.path.join(png, sorted(os.listdir(png))[0])
  # The same radiograph as a PNG and as DICOMs (MONOCHROME2 12-bit, MONOCHROME1 16-bit) in a folder.
  pytest.importorskip("pydicom")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tests.test_dicom import _12bit, _write  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, "to_explain")
  os.makedirs(folder, exist_ok=True)
  with Image.open(chosen) as im:
    pixels = np.asarray(im.convert("L"), np.uint8)
  _write(os.path.join(folder, "m2_12bit.dcm"), _12bit(pixels), bits=12)
  _write(os.path.join(folder, "m1_16bit.dcm"), (65535 - pixels.astype(np.uint16) * 257),
         "MONOCHROME1", bits=16)
  proc = agcg("explain", "--config", TINY, "--workdir", workdir, "--image", chosen, folder)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stem = os.path.splitext(os.path.basename(chosen))[0]
  out = os.path.join(workdir, "explained")
  for d in ("to_cardiomegaly", "to_no_finding"):
    assert os.path.getsize(os.path.join(out, stem, f"figure_{d}.png")) > 1000
  preds = json.load(open(os.path.join(out, "predictions.json")))
  assert [r["name"] for r in preds] == [stem, "m1_16bit", "m2_12bit"]
  for r in preds:
    assert abs(r["p_no_finding"] + r["p_cardiomegaly"] - 1.0) < 1e-5
  with open(os.path.join(out, "predictions.csv")) as f:
    assert len(f.read().strip().splitlines()) == 1 + len(preds)
  # A DICOM gives the same maps as the equivalent PNG.
  for name in ("m1_16bit", "m2_12bit"):
    for m in ("cam", "attention_to_cardiomegaly", "difference_to_no_finding"):
      np.testing.assert_allclose(np.load(os.path.join(out, name, f"{m}.npy")),
                                 np.load(os.path.join(out, stem, f"{m}.npy")), atol=1e-5)
  bad = agcg("explain", "--config", TINY, "--workdir", workdir, "--image", __file__)
  assert_one_line_error(bad, "not a readable image")


@pytest.mark.slow
def test_evaluating_with_other_networks_is_one_line(tiny_run):
  workdir, _ = tiny_run
  proc = agcg("evaluate", "--config", TINY, "--workdir", workdir, "--config.model.cls_layers=3")
  assert_one_line_error(proc, "trained with other networks", "model.cls_layers=2 there, 3 here")


@pytest.mark.slow
def test_evaluate_scores_every_batch_and_stops_at_max_examples(tiny_run, tmp_path):
  """Evaluation runs one batch ahead: the last batch is still scored, and max_examples still stops it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  for extra, n in (((), 16), (("--config.eval.max_examples=5",), 8)):
    proc = agcg("evaluate", "--config", TINY, "--workdir", workdir, "--config.eval.batch_size=4", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.json")) as f:
      m = json.load(f)
    assert m["num_test"] == np.sum(m["confusion_original"]) == n
    with open(os.path.join(workdir, "eval", "per_image.csv")) as f:
      ids = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == n


@pytest.mark.slow
def test_image_size_other_than_the_prepared_data_is_one_line(tiny_run):
  workdir, _ = tiny_run
  proc = agcg("evaluate", "--config", TINY, "--workdir", workdir, "--config.data.image_size=64")
  # The dataset a config opens is named by its options: another size is another dataset.
  assert_one_line_error(proc, "s64_n32_t16_seed0", "it holds phantom_chest_xray/s32_n32_t16_seed0",
                        "agcg prepare")


@pytest.mark.slow
def test_a_rerun_finds_its_compilations_in_the_workdir(tmp_path, data_dir):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # Every compilation is cached, whatever this machine's speed (the 1 s default would make
  # the test depend on how long the tiny networks take to compile).
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  workdir = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-m", "agcg_jax.cli", "train-classifier", "--config", TINY,
                         "--workdir", workdir, f"--config.data.dir={data_dir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cache = os.path.join(workdir, "compile_cache")
  assert os.path.isdir(cache) and os.listdir(cache)
