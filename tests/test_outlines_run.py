"""The outlined-radiograph path end to end on real images: prepare, train (with the segmenter), score."""
import csv
import os

import numpy as np
import pytest

from agcg_jax import commands
from agcg_jax import config as config_lib
from agcg_jax import evaluate
from agcg_jax import report
from agcg_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "outlines")


@pytest.mark.slow
def test_outlined_radiographs_are_scored_against_the_drawn_hearts(tmp_path, tiny_config,
                                                                  one_device_mesh):
  config = config_lib.apply_overrides(tiny_config, [
      "data.kind=ctr_masks", f"data.ctr_masks.source={FIXTURE}", "data.ctr_masks.test_fraction=0.25",
      "segmenter.steps=4", "segmenter.width=4", "segmenter.depth=2", "segmenter.batch_per_device=2",
      "segmenter.log_every=2"])
  workdir = str(tmp_path / "run")
  commands.prepare(config, workdir)
  for name in ("classifier", "gan", "segmenter"):
    _, status = train.train_stage(name, config, workdir, one_device_mesh, progress=False)
    assert status == "done"
  m = evaluate.evaluate(config, workdir, progress=False)
  assert m["dataset"] == "ctr_masks" and m["num_test"] == 2
  for k in ("attention", "cam", "diff", "prior"):
    assert np.isfinite(m[f"{k}_heart_border_enrichment"]), k
  assert 0 < m["heart_border_share"] < 1
  # The prior is the mean training border band: on held-out hearts it sits near their borders.
  assert m["prior_heart_border_enrichment"] > 1.0
  for k in ("ctr_ruler_mae", "ctr_direction_correct", "flip_rate", "ctr_ruler_measured"):
    assert k in m, k
  # One row per scored image; its CTR columns are the segmenter's, and they give the pooled share.
  with open(os.path.join(workdir, "eval", "per_image.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == m["num_test"]
  assert {r["label"] for r in rows} <= {"No Finding", "Cardiomegaly"}
  measured = sum(np.isfinite(float(r["ctr_real"])) for r in rows)
  assert measured == round(m["ctr_ruler_measured"] * len(rows))
  print("per-image", measured, m["ctr_direction_correct"], m["flip_rate"])
  right = [(float(r["ctr_change"]) > 0) == (r["direction"] == "to_cardiomegaly")
           and float(r["ctr_change"]) != 0 for r in rows if np.isfinite(float(r["ctr_change"]))]
  assert np.isclose(sum(right) / len(rows), m["ctr_direction_correct"])
  flips = [r["pred"] != r["pred_translated"] for r in rows]
  assert np.isclose(np.mean(flips), m["flip_rate"])
  assert all(np.isfinite(float(r["attention_border_enrichment"])) for r in rows)
  html = open(report.write_report(workdir)).read()
  assert "heart-border enrichment" in html and "CTR ruler error" in html
