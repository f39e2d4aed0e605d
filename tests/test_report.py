"""Tests for agcg_jax.report and agcg_jax.figures: the figures and the HTML page of a run."""
import dataclasses
import html
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from agcg_jax import figures, report
from agcg_jax import workdir as workdir_lib
from agcg_jax.errors import UserError
from agcg_jax.examples import ExampleMaps
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


def _metric_rows(page: str) -> dict[str, tuple[str, str]]:
  """Metric table rows of the page: label -> (value, chance / baseline)."""
  rows = re.findall(r"<tr><td>([^<]*)</td><td class='num'>([^<]*)</td>"
                    r"<td class='num base'>([^<]*)</td>", page)
  return {html.unescape(k): (html.unescape(v), html.unescape(b)) for k, v, b in rows}


def _headline(page: str) -> str:
  return html.unescape(re.search(r"<p class='headline'>(.*?)</p>", page).group(1))


def test_report_is_written_with_headline_numbers(phantom_run):
  workdir, path, page = phantom_run
  assert path == os.path.join(workdir, "report.html")
  assert page.startswith("<!DOCTYPE html>")
  headline = _headline(page)
  for text in (fixtures.ACCURACY_ORIGINAL_TEXT, fixtures.ACCURACY_TRANSLATED_TEXT,
               "chance 55.0%",  # accuracy_chance beside the accuracy
               "flips 60.0%", "twins flip 90.0%",  # flip_rate beside flip_rate_twin
               "3.21× enriched on the true change",  # attention_truth_enrichment
               "decision map 1.87×", "prior 2.46×", "chance 1×",
               "counterfactual error is 0.620",
               "85.0% (CTR regressor) and 77.5% (model-free ruler) of translations; "
               "chance 50.0%"):
    assert text in headline, (text, headline)
  for name in fixtures.CLASS_NAMES:
    assert name in page


def test_every_metric_has_a_labelled_row_beside_its_baseline(phantom_run):
  _, _, page = phantom_run
  rows = _metric_rows(page)
  expected = {
      "Test images": ("20", ""),
      "Accuracy, original": ("80.0%", "chance 55.0%"),
      "Accuracy, translated": ("30.0%", "chance 55.0%"),
      "Prediction flip rate": ("60.0%", "twins 90.0%"),
      "Flip rate: No Finding": ("70.0%", ""),
      "Flip rate: Cardiomegaly": ("50.0%", ""),
      "Flip rate on exact twins": ("90.0%", ""),
      "Decision map scored": ("margin", ""),
      "Decision map-attention correlation": ("0.412", "chance 0.000"),
      "Truth support area": ("8.1%", ""),
      "Attention truth enrichment": ("3.210", "chance 1.000, prior 2.460"),
      "Decision map truth enrichment": ("1.870", "chance 1.000, prior 2.460"),
      "|fake − real| truth enrichment": ("4.050", "chance 1.000, prior 2.460"),
      "Prior truth enrichment": ("2.460", "chance 1.000"),
      "Attention-truth correlation": ("0.512", "chance 0.000, prior 0.387"),
      "Decision map-truth correlation": ("0.153", "chance 0.000, prior 0.387"),
      "Attention top-k IoU with truth": ("0.311", "chance 0.0421, prior 0.268"),
      "Prior top-k IoU with truth": ("0.268", "chance 0.0421"),
      "Top-k IoU by chance": ("0.0421", ""),
      "Counterfactual error": ("0.620", "doing nothing 1.000"),
      "Change inside truth": ("21.500", "outside 3.250"),
      "Change outside truth": ("3.250", ""),
      "CTR moved the right way": ("85.0%", "chance 50.0%"),
      "CTR moved the right way (ruler)": ("77.5%", "chance 50.0%, ceiling 95.0%"),
      "Mean CTR change: No Finding → Cardiomegaly": ("+0.061", ""),
      "Mean CTR change: Cardiomegaly → No Finding": ("-0.048", ""),
      "Mean CTR change (ruler): No Finding → Cardiomegaly": ("+0.052", ""),
      "CTR crosses 0.5": ("45.0%", ""),
      "CTR regressor MAE": ("0.0123", "fixed guess 0.0634"),
      "Ruler MAE": ("0.0215", "fixed guess 0.0634"),
      "CTR MAE of a fixed guess": ("0.0634", ""),
      "Ruler orders twins": ("95.0%", ""),
      "Direction by chance": ("50.0%", ""),
  }
  for label, value in expected.items():
    assert rows.get(label) == value, (label, rows.get(label))
  # Every metrics.json key the fixture writes has a row (dict keys one per entry).
  shown = {k for k in fixtures.metrics() if k not in report.NOT_METRICS}
  assert len(rows) == sum(len(v) if isinstance(v, dict) else 1
                          for k, v in fixtures.metrics().items() if k in shown)
  assert "1 = chance" in page  # the enrichment rows explain their scale
  assert "Chance / baseline" in page
  assert "Checkpoints: classifier step 400, AG-CycleGAN step 2000" in page
  # The old border/box metrics are gone from the page.
  assert "border enrichment" not in page and "Attention in box" not in page
  # Sections head their rows, in order.
  sections = re.findall(r"<th colspan='4' class='section'>([^<]*)</th>", page)
  assert [html.unescape(s) for s in sections] == [
      report.SECTIONS[k] for k in ("num_test", "truth_support_share", "ctr_direction_correct")]


def test_baselines_use_what_metrics_has():
  m = {"attention_truth_enrichment": 3.0, "prior_truth_enrichment": 1.5,
       "attention_pointing": 0.5, "ctr_direction_correct": 0.9}
  assert report.baseline_text(m, "attention_truth_enrichment") == "chance 1.000, prior 1.500"
  del m["prior_truth_enrichment"]
  assert report.baseline_text(m, "attention_truth_enrichment") == "chance 1.000"
  # A baseline whose key is missing is left out, not made up.
  assert report.baseline_text(m, "attention_pointing", "pct") == ""
  assert report.baseline_text({**m, "fixed_point_pointing": 0.25}, "attention_pointing",
                              "pct") == "fixed point 25.0%"
  assert report.baseline_text(m, "ctr_direction_correct", "pct") == ""
  rows = {r.key: r for r in report.metric_rows({**m, "direction_chance": 0.5})}
  assert rows["ctr_direction_correct"].baseline == "chance 50.0%"
  assert "prior_truth_enrichment" not in rows  # missing keys are simply not shown


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
  with pytest.raises(UserError, match=re.escape(path)) as info:
    report.write_report(workdir)
  message = str(info.value)
  assert "\n" not in message
  assert "agcg evaluate" in message
  assert not os.path.exists(os.path.join(workdir, "report.html"))


def test_missing_examples_is_a_user_error_naming_the_file(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  path = os.path.join(workdir, "eval", "examples.npz")
  os.remove(path)
  with pytest.raises(UserError, match=re.escape(path) + ".*not found.*agcg evaluate"):
    workdir_lib.load_examples(workdir)


def test_old_or_corrupt_examples_file_is_a_user_error(tmp_path):
  # An examples.npz in the old dict-of-keys format, then one that is not an npz at all.
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  path = os.path.join(workdir, "eval", "examples.npz")
  np.savez(path, to_cardiomegaly_real=np.zeros((1, 8, 8), np.float32))
  with pytest.raises(UserError, match=re.escape(path) + ".*missing") as info:
    workdir_lib.load_examples(workdir)
  assert "\n" not in str(info.value)
  with open(path, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(UserError, match=re.escape(path)):
    workdir_lib.load_examples(workdir)


def test_corrupt_metrics_raises_user_error(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(UserError, match="metrics.json"):
    workdir_lib.load_metrics(workdir)


def test_nih_run_without_optional_arrays_or_logs(tmp_path):
  # NIH: no CTR, heart masks or twins in the examples, box metrics instead of
  # phantom ones, two empty CAM cells, no training logs.
  workdir = fixtures.make_workdir(tmp_path, dataset="nih", size=48, n=3, with_logs=False,
                                  empty_cells=((1, 0), (0, 1)))
  # Keys the report does not know yet still get a row each.
  metrics_path = os.path.join(workdir, "metrics.json")
  with open(metrics_path) as f:
    metrics = json.load(f)
  metrics.update(new_score=0.25, per_class_score={"Cardiomegaly": 0.125})
  with open(metrics_path, "w") as f:
    json.dump(metrics, f)
  page = _read(report.write_report(workdir))
  rows = _metric_rows(page)
  assert rows["New score"] == ("0.250", "")
  assert rows["Per class score: Cardiomegaly"] == ("0.125", "")
  assert rows["Boxed test images"] == ("8", "")
  assert rows["Box area"] == ("18.3%", "")
  assert rows["Attention box enrichment"] == ("1.420", "chance 1.000, prior 1.290")
  assert rows["Decision map box enrichment"] == ("1.170", "chance 1.000, prior 1.290")
  assert rows["Prior box enrichment"] == ("1.290", "chance 1.000")
  assert rows["Attention pointing game"] == ("75.0%", "fixed point 62.5%")
  assert rows["Decision map pointing game"] == ("50.0%", "fixed point 62.5%")
  assert rows["|fake − real| pointing game"] == ("87.5%", "fixed point 62.5%")
  # No twins on NIH: the flip rate stands alone, no phantom rows are made up.
  assert rows["Prediction flip rate"] == ("60.0%", "")
  assert not any("truth" in label or "CTR" in label for label in rows)
  assert set(_figure_links(page)) == EXPECTED_FIGURES - {"figures/training_curves.png"}
  assert "No training logs" in page
  headline = _headline(page)
  assert "CTR" not in headline and "counterfactual" not in headline
  for text in ("1.42× the boxes' area share", "prior 1.29×", "chance 1×",
               "in the box for 75.0% of boxed images", "fixed point: 62.5%"):
    assert text in headline, (text, headline)


def test_cam_note_names_the_kind_in_use(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=False)
  page = _read(report.write_report(workdir))
  note = html.unescape(re.search(r"<p class='note cam-kind'>(.*?)</p>", page).group(1))
  assert "cam_kind = margin" in note and "w_NF + w_CM" in note and "random" in note
  metrics_path = os.path.join(workdir, "metrics.json")
  with open(metrics_path) as f:
    metrics = json.load(f)
  metrics["cam_kind"] = "equ9"
  with open(metrics_path, "w") as f:
    json.dump(metrics, f)
  page = _read(report.write_report(workdir))
  note = html.unescape(re.search(r"<p class='note cam-kind'>(.*?)</p>", page).group(1))
  assert "cam_kind = equ9" in note and "cam_kind = margin" not in note


@pytest.mark.parametrize("dataset", ["phantoms", "nih"])
def test_load_examples_roundtrips_example_maps(tmp_path, dataset):
  workdir = fixtures.make_workdir(tmp_path, dataset=dataset, n=3, with_logs=False)
  written = fixtures.examples(size=32, n=3, dataset=dataset)
  loaded = workdir_lib.load_examples(workdir)
  assert isinstance(loaded, ExampleMaps)
  assert len(loaded) == 6 and loaded.cam_kind == "margin"
  for field in dataclasses.fields(ExampleMaps):
    a, b = getattr(written, field.name), getattr(loaded, field.name)
    if a is None or isinstance(a, str):
      assert a == b, field.name
    else:
      assert b.dtype == a.dtype, field.name
      np.testing.assert_array_equal(a, b, err_msg=field.name)
  assert (loaded.twin is not None) == (dataset == "phantoms")
  assert (loaded.heart_mask is not None) == (dataset == "phantoms")
  assert loaded.id.dtype.kind == "U"
  # Plain arrays only: the file loads without pickles.
  with np.load(os.path.join(workdir, "eval", "examples.npz"), allow_pickle=False) as z:
    assert all(z[k].dtype != object for k in z.files)


def _image_axes(fig):
  return [ax for ax in fig.axes if ax.get_images()]


def test_translation_figure_shows_the_twin_beside_the_translation():
  examples = fixtures.examples(size=32, n=4)
  index = examples.where(direction="to_cardiomegaly")
  fig = figures.figure_translation(examples, "to_cardiomegaly", cases=[1, 3])
  columns = figures.translation_columns(True)
  assert columns == ("Real", "Attention", "Masked", "Fake", "Twin", "Diff", "|Twin − Real|")
  axes = _image_axes(fig)
  assert len(axes) == 2 * len(columns)
  assert [ax.get_title() for ax in axes[:len(columns)]] == list(columns)
  row = {name: axes[len(columns) + c] for c, name in enumerate(columns)}  # second row = case 3
  i = index[3]
  data = lambda name: np.asarray(row[name].get_images()[0].get_array())  # noqa: E731
  np.testing.assert_allclose(data("Masked"), examples.attention[i] * examples.generated[i],
                             rtol=1e-6)
  np.testing.assert_allclose(data("Twin"), examples.twin[i])
  np.testing.assert_allclose(data("Diff"), examples.fake[i] - examples.real[i], atol=1e-6)
  np.testing.assert_allclose(data("|Twin − Real|"), np.abs(examples.twin[i] - examples.real[i]),
                             atol=1e-6)
  # Diff is symmetric around 0; the true change shares its scale, so sizes compare.
  lo, hi = row["Diff"].get_images()[0].get_clim()
  assert lo == pytest.approx(-hi) and hi > 0
  assert row["|Twin − Real|"].get_images()[0].get_clim() == pytest.approx((0, hi))
  # Row label: id, prediction real -> translated, CTR.
  label = row["Real"].get_ylabel()
  short = figures.SHORT_NAMES
  assert label.split("\n") == [
      str(examples.id[i]),
      f"pred {short[examples.pred[i]]} {examples.prob[i]:.2f} → "
      f"{short[examples.pred_translated[i]]}",
      f"CTR {examples.ctr_real[i]:.2f} → {examples.ctr_fake[i]:.2f}"]
  # The original heart outline on Real, Attention, Fake and Twin.
  assert [bool(row[name].collections) for name in columns] == [
      True, True, False, True, True, False, False]


def test_translation_figure_without_twin_has_the_paper_columns():
  examples = fixtures.examples(size=32, n=2, dataset="nih")
  fig = figures.figure_translation(examples, "to_no_finding")
  axes = _image_axes(fig)
  assert [ax.get_title() for ax in axes[:5]] == list(figures.translation_columns(False))
  assert len(axes) == 2 * 5
  assert not any(ax.collections for ax in axes)  # no heart masks on NIH
  assert "CTR" not in axes[0].get_ylabel()  # NaN CTRs are not printed
  assert fig.get_suptitle() == "Cardiomegaly → No Finding"
  # Images of unknown class (`agcg explain`): the title names only the target.
  unknown = dataclasses.replace(examples, label=[-1] * len(examples))
  assert figures.figure_translation(unknown, "to_no_finding").get_suptitle() == (
      "Translated to No Finding")
  with pytest.raises(ValueError, match="direction"):
    figures.figure_translation(examples, "to_nowhere")


def test_cam_figure_handles_all_empty_cells(tmp_path):
  # Cases of unknown label (as `agcg explain` writes them) fall in no block.
  examples = dataclasses.replace(fixtures.examples(size=32, n=2), label=[-1] * 4)
  path = tmp_path / "cam.png"
  fig = figures.figure_cam(examples, path)
  assert not _image_axes(fig)
  texts = [t.get_text() for sub in fig.subfigs for t in sub.texts]
  assert texts.count("no such case in the test set") == 4
  with Image.open(path) as image:
    assert image.format == "PNG"


@pytest.mark.parametrize("cam_kind", ["margin", "equ9"])
def test_cam_figure_draws_the_signed_map_raw_on_one_symmetric_scale(cam_kind):
  examples = fixtures.examples(size=32, n=4, cam_kind=cam_kind)
  fig = figures.figure_cam(examples, per_cell=2)
  axes = _image_axes(fig)
  assert len(axes) == 3 * 2  # three non-empty blocks, two images each
  limits = set()
  for letter, (true, pred) in zip("abcd", figures.CAM_CELLS):
    for j, i in enumerate(examples.where(label=true, pred=pred)[:2]):
      ax = axes.pop(0)
      overlay = ax.get_images()[1]
      assert overlay.get_cmap().name == f"{figures.CAM_CMAP}_fading"
      # The map itself, not a per-image min-max rescaling of it.
      np.testing.assert_array_equal(np.asarray(overlay.get_array()), examples.cam[i])
      limits.add(overlay.get_clim())
      assert ax.get_title() == f"P({fixtures.CLASS_NAMES[pred]}) = {examples.prob[i]:.2f}"
  (lo, hi), = limits  # one scale for the whole figure
  assert lo == pytest.approx(-hi) and hi > 0
  # Case scales differ threefold: no per-image scale could share one limit.
  assert hi < np.abs(examples.cam).max()
  assert hi == pytest.approx(figures.symmetric_limit(
      *[examples.cam[examples.where(label=t, pred=p)[:2]] for t, p in figures.CAM_CELLS]))
  assert figures.CAM_KIND_TITLES[cam_kind] in fig.get_suptitle()
  assert any(ax.collections for ax in fig.axes)  # heart contours


def test_signed_overlay_fades_to_transparent_at_zero():
  cmap = figures.signed_overlay_cmap()
  assert cmap(0.5)[3] < 0.05  # near 0: the image shows through
  assert cmap(0.0)[3] == pytest.approx(figures.CAM_ALPHA)
  assert cmap(1.0)[3] == pytest.approx(figures.CAM_ALPHA)
  assert cmap(0.0)[2] > cmap(0.0)[0] and cmap(1.0)[0] > cmap(1.0)[2]  # blue below, red above


def test_symmetric_limit():
  assert figures.symmetric_limit(np.array([-3.0, 1.0])) == pytest.approx(
      np.percentile([3.0, 1.0], figures.LIMIT_PERCENTILE))
  assert figures.symmetric_limit(np.zeros(4), None) == pytest.approx(1e-6)
  assert figures.symmetric_limit() == pytest.approx(1e-6)


def test_training_curves_skip_missing_logs(tmp_path):
  workdir = fixtures.make_workdir(tmp_path, with_logs=True)
  assert workdir_lib.load_training_logs(tmp_path / "nowhere") == {}
  assert figures.figure_training_curves({}) is None
  logs = workdir_lib.load_training_logs(workdir)
  assert set(logs) == {"classifier", "gan"}
  fig = figures.figure_training_curves(logs)
  titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
  assert "Classifier: loss" in titles and "AG-CycleGAN: loss" in titles
  assert not any(t.startswith("CTR") for t in titles)
  # The truncated last line is skipped, not fatal; images_per_s is not plotted.
  assert all(row["step"] != 99999 for row in logs["gan"])
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
  assert report.format_value("margin", "text") == "margin"


def test_the_audit_warns_only_when_the_label_is_predicted_well_above_the_majority():
  strong = {"audit_outside_heart_accuracy": 0.80, "audit_majority_baseline": 0.50}
  weak = {"audit_outside_heart_accuracy": 0.55, "audit_majority_baseline": 0.50}
  assert "rather than the disease" in report.audit_warnings(strong)[0]
  assert report.audit_warnings(weak) == []
  assert "rather than the disease" in report.headline(strong)
  rows = {r.key: r for r in report.metric_rows(strong)}
  assert rows["audit_outside_heart_accuracy"].baseline == "majority 50.0%"
