"""Real radiographs end to end: the NIH fixture prepared, trained briefly, evaluated
against the expert Cardiomegaly boxes, and reported."""
import json
import os

import numpy as np
import pytest

from agcg_jax import config as config_lib
from agcg_jax import evaluate, report, train
from agcg_jax.data import nih

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nih")


@pytest.mark.slow
def test_nih_fixture_trains_and_is_scored_against_expert_boxes(tmp_path, tiny_config, one_device_mesh):
  data = str(tmp_path / "data")
  # The official split: every expert box of the release is on a test image.
  nih.prepare_nih(FIXTURE, data, size=32, split="official", balance="none", workers=1)
  config = config_lib.apply_overrides(tiny_config, [
      "data.kind=nih", f"data.dir={data}", "data.image_size=32", "classifier.class_weights=true"])
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
  for k in ("attention_in_box", "cam_in_box", "attention_pointing", "cam_pointing"):
    assert 0.0 <= m[k] <= 1.0, k
  # No phantom ground truth here: no CTR or border numbers are made up.
  assert not any(k.startswith(("ctr_", "attention_border")) for k in m)
  page = open(report.write_report(workdir)).read()
  assert "Attention in box" in page and "Cardiomegaly" in page
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["num_boxed"] == m["num_boxed"]
  examples = np.load(os.path.join(workdir, "eval", "examples.npz"), allow_pickle=False)
  assert examples["to_no_finding_real"].shape[1:] == (32, 32)
