"""Real radiographs end to end: the NIH fixture prepared, trained briefly, evaluated
against the expert Cardiomegaly boxes, and reported."""
import json
import os

import numpy as np
import pytest

from agcg_jax import config as config_lib
from agcg_jax import evaluate, report, train
from agcg_jax.data import tfds_nih
from agcg_jax.examples import ExampleMaps
from tests.test_multiprocess import _launch_cli as _launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nih")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nih_fixture_trains_and_is_scored_against_expert_boxes(tmp_path, tiny_config, one_device_mesh):
  data = str(tmp_path / "data")
  # The official split: every expert box of the release is on a test image.
  tfds_nih.prepare_nih(FIXTURE, data, size=32, split="official", balance="none", workers=1)
  overrides = ["data.kind=nih", f"data.dir={data}", "data.image_size=32", "data.nih.split=official",
               "data.nih.balance=none", "classifier.class_weights=true"]
  config = config_lib.apply_overrides(tiny_config, overrides)
  workdir = str(tmp_path / "run")
  for name in ("classifier", "gan"):
    train._record_stage_config(config, workdir, name)
    _, status = train.run_stage(train.STAGES[name](config, workdir, one_device_mesh), workdir,
                                one_device_mesh, progress=False)
    assert status == "done"
  m = evaluate.evaluate(config, workdir, progress=False)
  assert m["dataset"] == "nih"
  assert m["num_test"] == sum(map(sum, m["confusion_original"])) == 7
  assert m["num_boxed"] >= 1
  for k in ("attention_pointing", "cam_pointing", "diff_pointing", "box_area_share"):
    assert 0.0 <= m[k] <= 1.0, k
  for k in ("attention_box_enrichment", "cam_box_enrichment", "diff_box_enrichment"):
    assert np.isfinite(m[k]) and m[k] >= 0.0, k
  # The official split puts every box in the test set: the baselines are leave-one-out.
  if m["num_boxed"] >= 2:
    assert 0.0 <= m["fixed_point_pointing"] <= 1.0
    assert "leave-one-out" in m["box_baseline_source"]
  # The confounder audit reads the label file's fields the records carry (view, sex, age band).
  for k in ("audit_nonimage_accuracy", "audit_outside_heart_accuracy", "audit_majority_baseline"):
    assert k in m and (m[k] is None or 0.0 <= m[k] <= 1.0), k
  if m["num_boxed"] >= 2:
    assert np.isfinite(m["attention_box_swap_margin"]) and len(m["attention_box_swap_margin_ci"]) == 2
  # No phantom ground truth here: no CTR or truth numbers are made up.
  assert not any(k.startswith(("ctr_", "truth_")) or "_truth_" in k for k in m)
  page = open(report.write_report(workdir)).read()
  assert "Cardiomegaly" in page
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["num_boxed"] == m["num_boxed"]
  examples = ExampleMaps.load(os.path.join(workdir, "eval", "examples.npz"))
  assert examples.real.shape[1:] == (32, 32) and examples.twin is None

  # Two processes (real jax.distributed over localhost) score the same test set: each keeps its
  # own boxed images' maps, and the box-swap margin is computed over all of them.
  assert m["num_boxed"] >= 2
  os.remove(os.path.join(workdir, "metrics.json"))
  procs = _launch("evaluate", workdir, *[f"--config.{o}" for o in overrides], devices=1, num=2)
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    two = json.load(f)
  assert two["num_boxed"] == m["num_boxed"] and two["confusion_original"] == m["confusion_original"]
  for name in ("attention", "cam", "diff"):
    np.testing.assert_allclose(two[f"{name}_box_swap_margin"], m[f"{name}_box_swap_margin"],
                               rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(two[f"{name}_box_swap_margin_ci"], m[f"{name}_box_swap_margin_ci"],
                               rtol=1e-5, atol=1e-6, err_msg=name)
