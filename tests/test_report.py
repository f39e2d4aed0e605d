"""Tests for agcg_jax.report: the figures and the HTML page of an evaluated run."""
import html
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from agcg_jax import report
from agcg_jax.errors import UserError
from tests import report_fixtures as fixtures

EXPECTED_FIGURES = {
    "figures/translation_to_cardiomegaly.png",
    "figures/translation_to_no_finding.png",
    "figures/cam.png",
    "figures/training_curves.png",
}


def _figure_links(page: str) -> list[str]:
  return re.findall(r'<img src="([^"]+)"', page)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
  """A synthetic phantom run and its rendered page (rendered once for the module)."""
  workdir = fixtures.make_workdir(tmp_path_factory.mktemp("phantoms"))
  path = report.write_report(workdir)
  return workdir, path, _read(path)


def test_report_is_written_with_headline_numbers(phantom_run):
  workdir, path, page = phantom_run
  assert path == os.path.join(workdir, "report.html")
  assert page.startswith("<!DOCTYPE html>")
  headline = re.search(r"<p class='headline'>(.*?)</p>", page).group(1)
  assert fixtures.ACCURACY_ORIGINAL_TEXT in headline
  assert fixtures.ACCURACY_TRANSLATED_TEXT in headline
  assert "85.0%" in headline  # ctr_direction_correct
  assert "3.21×" in headline  # attention_border_enrichment
  for name in fixtures.CLASS_NAMES:
    assert name in page


def test_every_numeric_metric_has_a_labelled_row(phantom_run):
  _, _, page = phantom_run
  rows = dict(re.findall(r"<tr><td>([^<]*)</td><td class='num'>([^<]*)</td>", page))
  rows = {html.unescape(k): html.unescape(v) for k, v in rows.items()}
  expected = {
      "Test images": "20",
      "Accuracy, original": "80.0%",
      "Accuracy, translated": "30.0%",
      "Prediction flip rate: No Finding": "70.0%",
      "Prediction flip rate: Cardiomegaly": "50.0%",
      "Attention border enrichment": "3.210",
      "CAM border enrichment": "1.870",
      "CAM-attention correlation": "0.412",
      "CTR moved the right way": "85.0%",
      "Mean CTR change: No Finding → Cardiomegaly": "+0.061",
      "Mean CTR change: Cardiomegaly → No Finding": "-0.048",
      "CTR regressor MAE": "0.0123",
  }
  for label, value in expected.items():
    assert rows.get(label) == value, (label, rows.get(label))
  assert "1 = chance" in page  # the enrichment row explains its scale


def test_confusion_matrices_are_tables_with_class_names(phantom_run):
  _, _, page = phantom_run
  tables = re.findall(r"<table class='confusion'>(.*?)</table>", page)
  assert len(tables) == 2
  for table, matrix in zip(tables, (fixtures.CONFUSION_ORIGINAL, fixtures.CONFUSION_TRANSLATED)):
    assert "<th>Predicted No Finding</th><th>Predicted Cardiomegaly</th>" in table
    rows = re.findall(r"<tr><th>Actual ([^<]+)</th>(.*?)</tr>", table)
    assert [name for name, _ in rows] == fixtures.CLASS_NAMES
    for (_, cells), counts in zip(rows, matrix):
      values = [int(v) for v in re.findall(r"<td[^>]*>(\d+)", cells)]
      assert values == [*counts, sum(counts)]
  assert "Positive" in page  # the note mapping the paper's Table 2 rows


def test_figures_are_linked_and_are_valid_pngs(phantom_run):
  workdir, _, page = phantom_run
  links = _figure_links(page)
  assert set(links) == EXPECTED_FIGURES
  for link in links:
    assert not os.path.isabs(link)
    with Image.open(os.path.join(workdir, link)) as image:
      assert image.format == "PNG"
      assert image.width >= 300 and image.height >= 200
      image.verify()


def test_page_is_self_contained_and_escaped(phantom_run):
  _, _, page = phantom_run
  assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)
  assert "<script" not in page
  assert "&lt;script&gt;" in page  # the config's string, escaped
  assert "<details><summary>Config</summary><pre>" in page


@pytest.mark.parametrize("name", ["metrics.json", "examples.npz"])
def test_missing_input_raises_user_error(tmp_path, name):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  path = os.path.join(workdir, "metrics.json") if name == "metrics.json" else os.path.join(
      workdir, "eval", "examples.npz")
  os.remove(path)
  with pytest.raises(UserError, match=re.escape(name)) as info:
    report.write_report(workdir)
  message = str(info.value)
  assert "\n" not in message
  assert "agcg evaluate" in message
  assert not os.path.exists(os.path.join(workdir, "report.html"))


def test_corrupt_metrics_raises_user_error(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(UserError, match="metrics.json"):
    report.load_metrics(workdir)


def test_nih_run_without_optional_arrays_or_logs(tmp_path):
  # NIH: no CTR or heart masks in the examples, box metrics instead of phantom
  # ones, several empty CAM cells, no training logs.
  workdir = fixtures.make_workdir(
      tmp_path, dataset="nih", size=48, n=3, with_logs=False,
      empty_cells=("cardiomegaly_as_no_finding", "no_finding_as_cardiomegaly"))
  # Keys the report does not know yet still get a row each.
  metrics_path = os.path.join(workdir, "metrics.json")
  with open(metrics_path) as f:
    metrics = json.load(f)
  metrics.update(new_score=0.25, per_class_score={"Cardiomegaly": 0.125})
  with open(metrics_path, "w") as f:
    json.dump(metrics, f)
  page = _read(report.write_report(workdir))
  assert "<tr><td>New score</td><td class='num'>0.250</td>" in page
  assert "<tr><td>Per class score: Cardiomegaly</td><td class='num'>0.125</td>" in page
  assert set(_figure_links(page)) == EXPECTED_FIGURES - {"figures/training_curves.png"}
  assert "No training logs" in page
  assert "Attention in box" in page and "63.4%" in page
  assert "Boxed test images" in page
  assert "border enrichment" not in page
  assert "CTR" not in re.search(r"<p class='headline'>(.*?)</p>", page).group(1)


def test_load_examples_roundtrip_without_pickle(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  examples = report.load_examples(workdir)
  assert examples["to_cardiomegaly_real"].shape == (2, 32, 32)
  assert examples["cam_cardiomegaly_as_no_finding_image"].shape == (0, 32, 32)
  assert examples["to_no_finding_id"].dtype.kind == "U"


def test_translation_figure_rows_and_panels():
  examples = fixtures.examples(size=32, n=4)
  fig = report.figure_translation(examples, "to_cardiomegaly", cases=[1, 3])
  image_axes = [ax for ax in fig.axes if ax.get_images()]
  assert len(image_axes) == 2 * 5
  assert [ax.get_title() for ax in image_axes[:5]] == ["Real", "Attention", "Masked", "Fake",
                                                       "Diff"]
  # Diff is symmetric around 0, and Masked is attention * generated.
  diff = image_axes[4].get_images()[0]
  lo, hi = diff.get_clim()
  assert lo == pytest.approx(-hi) and hi > 0
  masked = image_axes[2].get_images()[0].get_array()
  np.testing.assert_allclose(
      masked, examples["to_cardiomegaly_attention"][1] * examples["to_cardiomegaly_generated"][1],
      rtol=1e-6)
  # CTR annotation and heart contours (on Real and Attention only).
  assert "CTR" in image_axes[0].get_ylabel() and "→" in image_axes[0].get_ylabel()
  assert [bool(ax.collections) for ax in image_axes[:5]] == [True, True, False, False, False]


def test_cam_figure_handles_all_empty_cells(tmp_path):
  examples = fixtures.examples(size=32, n=2, empty_cells=(
      "cardiomegaly_as_cardiomegaly", "cardiomegaly_as_no_finding",
      "no_finding_as_cardiomegaly", "no_finding_as_no_finding"))
  path = tmp_path / "cam.png"
  fig = report.figure_cam(examples, path)
  assert not [ax for ax in fig.axes if ax.get_images()]
  texts = [t.get_text() for sub in fig.subfigs for t in sub.texts]
  assert texts.count("no such case in the test set") == 4
  with Image.open(path) as image:
    assert image.format == "PNG"


def test_cam_figure_overlays_normalised_cam_with_probability():
  examples = fixtures.examples(size=32, n=3)
  fig = report.figure_cam(examples, per_cell=2)
  image_axes = [ax for ax in fig.axes if ax.get_images()]
  assert len(image_axes) == 3 * 2  # three non-empty blocks, two images each
  first = image_axes[0]
  overlay = first.get_images()[1]
  assert overlay.get_alpha() == pytest.approx(report.CAM_ALPHA)
  data = np.asarray(overlay.get_array())
  assert data.min() == pytest.approx(0) and data.max() == pytest.approx(1)
  prob = examples["cam_cardiomegaly_as_cardiomegaly_prob"][0]
  assert first.get_title() == f"P(Cardiomegaly) = {prob:.2f}"


def test_training_curves_skip_missing_logs(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=True)
  assert report.figure_training_curves(tmp_path / "nowhere") is None
  fig = report.figure_training_curves(workdir)
  titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
  assert "Classifier: loss" in titles and "AG-CycleGAN: loss" in titles
  assert not any(t.startswith("CTR") for t in titles)
  # The truncated last line is skipped, not fatal; images_per_s is not plotted.
  legends = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts}
  assert {"loss", "accuracy", "g_loss", "d_loss", "cycle", "d_real_cardiomegaly",
          "gen_cardiomegaly"} <= legends
  assert "images_per_s" not in legends


def test_format_value():
  assert report.format_value(0.77, "pct") == "77.0%"
  assert report.format_value(float("nan"), "pct") == "n/a"
  assert report.format_value(None) == "n/a"
  assert report.format_value(3, "int") == "3"
  assert report.format_value(-0.0481, "signed") == "-0.048"
  assert report.format_value(1.23456) == "1.235"
