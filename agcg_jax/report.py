"""The HTML page of one run, from what `agcg evaluate` and training wrote.

Inputs, all under the run's workdir:

  metrics.json           the evaluation metrics (see `METRICS`).
  eval/examples.npz      the example cases (`examples.ExampleMaps`): paper Fig. 4 and 5.
  <stage>/metrics.jsonl  one JSON object per logged training step.

Outputs: `<workdir>/figures/*.png` (drawn by `figures`) and
`<workdir>/report.html`, a page that needs nothing but those files (no
external CSS, JS or fonts). This module reads the inputs, formats the
metrics (each beside its chance level or baseline) and writes the page.
"""
import datetime
import html
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from agcg_jax import figures
from agcg_jax import files
from agcg_jax import workdir as wd
from agcg_jax.data.records import CLASS_KEYS, CLASS_NAMES
from agcg_jax.figures import DIRECTION_NAMES, is_number

_MAP_NAMES = {"attention": "Attention", "cam": "Decision map", "diff": "|fake − real|",
              "prior": "Prior"}


def _truth_enrichment(m: str) -> tuple[str, str, str]:
  what = {"attention": "the attention's", "cam": "the decision map's",
          "diff": "|fake − real|'s", "prior": "the prior's"}[m]
  extra = (" Prior = the mean truth support of the training set: a map that knows only "
           "where hearts usually differ; a map must beat it to show it reads this image."
           if m == "prior" else "")
  return (f"{_MAP_NAMES[m]} truth enrichment", "float",
          f"Share of {what} positive mass on the truth support, divided by the support's "
          f"share of the body; 1 = chance (a map uniform over the body).{extra}")


def _truth_pearson(m: str) -> tuple[str, str, str]:
  return (f"{_MAP_NAMES[m]}-truth correlation", "float",
          f"Pearson r over body pixels between the {_MAP_NAMES[m].lower()} and |twin − real| "
          "(0 = chance).")


def _truth_iou(m: str) -> tuple[str, str, str]:
  return (f"{_MAP_NAMES[m]} top-k IoU with truth", "float",
          f"IoU of the {_MAP_NAMES[m].lower()}'s top-k body pixels (k = support size) with "
          "the truth support.")


def _box_enrichment(m: str) -> tuple[str, str, str]:
  extra = " Prior = the mean training box mask." if m == "prior" else ""
  return (f"{_MAP_NAMES[m]} box enrichment", "float",
          f"Share of the {_MAP_NAMES[m].lower()}'s positive mass inside the radiologist's box, "
          f"divided by the box's share of the image; 1 = chance.{extra}")


def _pointing(m: str) -> tuple[str, str, str]:
  return (f"{_MAP_NAMES[m]} pointing game", "pct",
          f"Share of boxed images whose {_MAP_NAMES[m].lower()} maximum lies inside the box.")


_MAPS = ("attention", "cam", "diff", "prior")

# Known metrics.json keys, in display order: key -> (label, format, explanation).
# Formats: "pct" (fraction shown as %), "float", "signed" (3 decimals with a
# sign), "int", "text" (a string). Dict-valued keys are expanded per entry.
METRICS = {
    # Classifier and translation.
    "num_test": ("Test images", "int", "Number of test images evaluated."),
    "accuracy_original": (
        "Accuracy, original", "pct",
        "Share of the original test images the classifier labels correctly."),
    "accuracy_translated": (
        "Accuracy, translated", "pct",
        "Share of translated test images still classified as their source class "
        "(labels are those of the source image). A translation that really "
        "changes the class drives this down; the paper went from 77.0% to 19.4%."),
    "accuracy_chance": (
        "Accuracy by chance", "pct",
        "The test set's majority-class share: the accuracy of always answering that class."),
    "flip_rate": (
        "Prediction flip rate", "pct",
        "Share of all test images whose predicted class changed after translation into "
        "the other class."),
    "flip_rate_by_class": (
        "Flip rate", "pct",
        "Share of that source class's test images whose predicted class changed after "
        "translation."),
    "flip_rate_twin": (
        "Flip rate on exact twins", "pct",
        "Phantoms: the same classifier on each test image's counterfactual twin (the "
        "phantom rendered with the other label); the flip rate a perfect translation "
        "would reach."),
    "cam_kind": (
        "Decision map scored", "text",
        "margin: CAM of the predicted class minus CAM of the other (its mean plus the bias "
        "gap is the logit margin); equ9: the paper's CAM of the predicted class."),
    "cam_attention_pearson": (
        "Decision map-attention correlation", "float",
        "Pearson r over pixels between the classifier's decision map and the translator's "
        "attention map (1 = same pattern, 0 = unrelated)."),
    # Phantom ground truth: the counterfactual twins.
    "truth_support_share": (
        "Truth support area", "pct",
        "Truth support = body pixels where the counterfactual twin differs from the image by "
        "more than 8 grey levels; its share of the body is the chance level of a map's mass "
        "share on it."),
    **{f"{m}_truth_enrichment": _truth_enrichment(m) for m in _MAPS},
    **{f"{m}_truth_pearson": _truth_pearson(m) for m in _MAPS},
    **{f"{m}_truth_topk_iou": _truth_iou(m) for m in _MAPS},
    "truth_topk_iou_chance": (
        "Top-k IoU by chance", "float",
        "Top-k IoU with the truth support of k body pixels drawn at random."),
    "counterfactual_error": (
        "Counterfactual error", "float",
        "Σ MAE(fake, twin) / Σ MAE(real, twin): how far the translation is from the exact "
        "counterfactual; 0 = perfect, 1 = as far as doing nothing."),
    "change_inside_truth": (
        "Change inside truth", "float",
        "Mean |fake − real| in grey levels (0–255) on the truth support, within the body."),
    "change_outside_truth": (
        "Change outside truth", "float",
        "Mean |fake − real| in grey levels (0–255) off the truth support, within the body: "
        "change where the twin says nothing should change."),
    # Cardiothoracic ratio.
    "ctr_direction_correct": (
        "CTR moved the right way", "pct",
        "Share of translated test images whose cardiothoracic ratio, measured by the CTR "
        "regressor, moved in the intended direction (up towards Cardiomegaly, down towards "
        "No Finding)."),
    "ctr_direction_correct_model_free": (
        "CTR moved the right way (ruler)", "pct",
        "The same, measured by a model-free ruler reading the cardiac silhouette width from "
        "the image (no network that a translation could fool)."),
    "ctr_shift": (
        "Mean CTR change", "signed",
        "Mean change of the regressor's CTR (translated minus original) for this direction; "
        "should be positive towards Cardiomegaly and negative towards No Finding."),
    "ctr_shift_model_free": (
        "Mean CTR change (ruler)", "signed",
        "The same change measured by the model-free ruler."),
    "ctr_crosses_threshold": (
        "CTR crosses 0.5", "pct",
        "Share of translated test images whose measured CTR ends on the target class's side "
        "of 0.5 (the phantoms' label threshold)."),
    "ctr_regressor_mae": (
        "CTR regressor MAE", "float",
        "Mean absolute error of the CTR regressor on real test images, in CTR units."),
    "ctr_mae_fixed_prior": (
        "CTR MAE of a fixed guess", "float",
        "Mean absolute error of always answering one CTR learnt from the training set: the "
        "baseline a CTR instrument must beat."),
    "ruler_mae": (
        "Ruler MAE", "float",
        "Mean absolute error of the model-free ruler against the true CTR on real test "
        "phantoms, in CTR units."),
    "ruler_measured": (
        "Ruler measured, real", "pct",
        "Share of real test images the model-free ruler could measure (lungs and both heart "
        "borders found); the others count as wrong directions and are left out of its MAE."),
    "ruler_measured_translated": (
        "Ruler measured, translated", "pct",
        "Share of translated test images the model-free ruler could measure."),
    "ruler_twin_order": (
        "Ruler orders twins", "pct",
        "Share of test (image, twin) pairs whose CTRs the ruler orders right: the ceiling of "
        "the ruler's direction score."),
    "direction_chance": (
        "Direction by chance", "pct", "Chance level of the CTR direction scores."),
    # NIH expert boxes.
    "num_boxed": (
        "Boxed test images", "int",
        "Number of test images with a radiologist's Cardiomegaly bounding box (NIH "
        "BBox_List)."),
    "box_area_share": (
        "Box area", "pct",
        "Mean box area / image area: the chance level of a map's mass share in the box."),
    **{f"{m}_box_enrichment": _box_enrichment(m) for m in _MAPS},
    **{f"{m}_pointing": _pointing(m) for m in ("attention", "cam", "diff")},
    "gaussian_prior_box_enrichment": (
        "Gaussian prior box enrichment", "float",
        "A Gaussian at the mean box centre (sigmas: the mean box's half sizes) scored like "
        "every map: a smooth map of where heart boxes usually are."),
    "fixed_point_pointing": (
        "Fixed-point pointing game", "pct",
        "The pointing game of one fixed point, the mean training box centre: the trivial "
        "baseline a map must beat."),
    **{f"{m}_box_swap_margin": (
        f"{_MAP_NAMES[m]} box-swap margin", "signed",
        f"The {_MAP_NAMES[m].lower()}'s mass share in its own image's box minus its mean "
        "share in the other test images' boxes (bootstrap 95% interval beside it). 0 = a map "
        "that does not know where this heart is, however well it sits where hearts usually "
        "are (a fixed prior scores 0).") for m in ("attention", "cam", "diff")},
    # Drawn heart outlines (outlined radiographs).
    "heart_border_share": (
        "Heart border band area", "pct",
        "Pixels within 2 px (at 64 px) of each row's leftmost and rightmost heart pixel, as a "
        "share of the thorax: the chance level of a map's mass share there."),
    **{f"{m}_heart_border_enrichment": (
        f"{_MAP_NAMES[m]} heart-border enrichment", "float",
        f"Share of the {_MAP_NAMES[m].lower()}'s positive mass in the band around the drawn "
        "heart's lateral borders (they set the CTR), over the band's share of the thorax; "
        "1 = chance." + (" Prior = the mean training band: a map that knows only where heart "
                         "borders usually are." if m == "prior" else ""))
       for m in _MAPS},
    "ctr_ruler_mae": (
        "CTR ruler error (segmenter)", "float",
        "Mean |CTR read by the heart-and-lung segmenter − CTR of the drawn masks| on the "
        "held-out images: how far the ruler that measures translated hearts can be trusted."),
    "ctr_ruler_pearson": (
        "CTR ruler correlation", "float",
        "Pearson r between the segmenter's CTR and the drawn CTR on the held-out images."),
    "ctr_ruler_measured": (
        "CTR ruler measured", "pct", "Share of test images where the segmenter found a heart "
        "and lungs."),
    # Confounder audit (audit.py).
    "audit_outside_heart_accuracy": (
        "Label from outside the heart", "pct",
        "Cross-validated accuracy of a logistic regression predicting the label of training "
        "images from statistics taken outside the (widened) heart region: intensity "
        "percentiles, body width and height, collimation. Near the majority baseline: the "
        "cohorts differ little outside the heart. Well above it: the translations may show "
        "these differences rather than the disease."),
    "audit_nonimage_accuracy": (
        "Label from non-image fields", "pct",
        "The same from the record's non-image fields (view, age, sex) where the data carry "
        "them."),
    "audit_majority_baseline": (
        "Audit majority baseline", "pct", "Accuracy of always answering the training "
        "majority class, over the same folds."),
    "audit_images": ("Audit images", "int", "Training images the audit read."),
}
# Where each section of the metric table starts.
SECTIONS = {
    "num_test": "Classifier and translation",
    "truth_support_share": "Against the counterfactual twins (phantoms)",
    "ctr_direction_correct": "Cardiothoracic ratio",
    "num_boxed": "Against the radiologists' boxes (NIH)",
    "heart_border_share": "Against the drawn hearts (outlined radiographs)",
    "audit_outside_heart_accuracy": "Confounder audit (training split)",
}
OTHER_SECTION = "Other"

# What each score is shown beside: key -> ((name, metrics key or constant), ...).
BASELINES = {
    "accuracy_original": (("chance", "accuracy_chance"),),
    "accuracy_translated": (("chance", "accuracy_chance"),),
    "flip_rate": (("twins", "flip_rate_twin"),),
    "cam_attention_pearson": (("chance", 0.0),),
    **{f"{m}_truth_enrichment": (("chance", 1.0), ("prior", "prior_truth_enrichment"))
       for m in _MAPS},
    **{f"{m}_truth_pearson": (("chance", 0.0), ("prior", "prior_truth_pearson")) for m in _MAPS},
    **{f"{m}_truth_topk_iou": (("chance", "truth_topk_iou_chance"),
                               ("prior", "prior_truth_topk_iou")) for m in _MAPS},
    "counterfactual_error": (("doing nothing", 1.0),),
    "change_inside_truth": (("outside", "change_outside_truth"),),
    "ctr_regressor_mae": (("fixed guess", "ctr_mae_fixed_prior"),),
    "ruler_mae": (("fixed guess", "ctr_mae_fixed_prior"),),
    "ctr_direction_correct": (("chance", "direction_chance"),),
    "ctr_direction_correct_model_free": (("chance", "direction_chance"),
                                         ("ceiling", "ruler_twin_order")),
    **{f"{m}_box_enrichment": (("chance", 1.0), ("prior", "prior_box_enrichment"),
                               ("Gaussian prior", "gaussian_prior_box_enrichment"))
       for m in _MAPS},
    **{f"{m}_pointing": (("fixed point", "fixed_point_pointing"),)
       for m in ("attention", "cam", "diff")},
    **{f"{m}_box_swap_margin": (("chance", 0.0),) for m in ("attention", "cam", "diff")},
    **{f"{m}_heart_border_enrichment": (("chance", 1.0), ("prior", "prior_heart_border_enrichment"))
       for m in _MAPS},
    "ctr_ruler_mae": (("fixed guess 0.5", "ctr_mae_fixed_prior"),),
    "ctr_ruler_pearson": (("chance", 0.0),),
    "audit_outside_heart_accuracy": (("majority", "audit_majority_baseline"),),
    "audit_nonimage_accuracy": (("majority", "audit_majority_baseline"),),
}
# An audit accuracy this far above its majority baseline is reported as a confounder.
AUDIT_MARGIN = 0.1
# Keys shown elsewhere on the page, never as metric rows: metadata, and the
# constant chance levels the "chance / baseline" column already shows.
NOT_METRICS = {"confusion_original", "confusion_translated", "class_names", "config",
               "dataset", "date", "device", "image_size", "classifier_step", "gan_step",
               "truth_enrichment_chance", "box_enrichment_chance",
               "counterfactual_error_identity", "audit_folds", "heart_border_enrichment_chance",
               "trained_on", "ctr_ruler", "audit_heart_box",
               "audit_heart_box_source"}

CAM_NOTE = (
    "With a two-class softmax head trained by cross-entropy, the gradients of the two class "
    "weight vectors are exactly opposite, so w_NF + w_CM never leaves its random initial "
    "value. The paper's Equ. 9 map of the predicted class, "
    "½ (w_NF + w_CM)·f ± ½ (w_CM − w_NF)·f, is therefore a random projection of the "
    "features plus half the decision. The margin map, CAM of the predicted class minus CAM "
    "of the other (w_pred − w_other)·f, whose spatial mean plus the bias gap is the logit "
    "margin, drops the part softmax ignores and shows only what decides. Maps are signed and "
    "drawn raw on one symmetric scale for the whole figure (red: for the predicted class, "
    "blue: against it), never min-max normalised per image.")
CAM_KIND_NOTES = {
    "margin": "This run shows and scores the margin map (cam_kind = margin).",
    "equ9": ("This run shows and scores the paper's literal Equ. 9 map of the predicted "
             "class (cam_kind = equ9); read it with the caveat below."),
}


# ------------------------------------------------------------ text and HTML


def format_value(value: Any, fmt: str = "float") -> str:
  """A metric value as text: "pct" -> "77.0%", "int", "signed" -> "+0.031", "float" -> "1.234"."""
  if not is_number(value):
    return "n/a" if value is None else str(value)
  if isinstance(value, float) and not math.isfinite(value):
    return "n/a"
  if fmt == "pct":
    return f"{value:.1%}"
  if fmt == "int":
    return f"{int(round(value)):d}"
  if fmt == "signed":
    return f"{value:+.3f}"
  if isinstance(value, int):
    return str(value)
  # Three decimals, but keep three significant digits of small values (an MAE of 0.0123).
  return f"{value:.3f}" if value == 0 or abs(value) >= 0.1 else f"{value:.3g}"


def _entry_label(entry: str) -> str:
  """A dict metric's entry key as text: a direction or a class name."""
  if entry in DIRECTION_NAMES:
    return " → ".join(DIRECTION_NAMES[entry])
  return dict(zip(CLASS_KEYS, CLASS_NAMES)).get(entry, entry)


class MetricRow(NamedTuple):
  section: str      # the heading of its part of the table (SECTIONS)
  key: str          # the metrics.json key
  label: str
  value: str        # formatted
  baseline: str     # "chance 1.000, prior 1.420"; "" if it has none
  explanation: str


def baseline_text(metrics: Mapping[str, Any], key: str, fmt: str = "float") -> str:
  """What `key` is shown beside, formatted like it: "chance 1.000, prior 1.420" ("" if nothing).

  Baselines that name a key absent from `metrics` are left out.
  """
  parts = []
  for name, source in BASELINES.get(key, ()):
    if source == key:  # the prior's own row
      continue
    value = metrics.get(source) if isinstance(source, str) else source
    if is_number(value):
      parts.append(f"{name} {format_value(value, fmt)}")
  ci = metrics.get(f"{key}_ci")
  if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(v) for v in ci):
    parts.append(f"95% CI [{format_value(ci[0], fmt)}, {format_value(ci[1], fmt)}]")
  return ", ".join(parts)


def metric_rows(metrics: Mapping[str, Any]) -> list[MetricRow]:
  """Every numeric (or `text`-format) metric as a `MetricRow`, each beside its baseline.

  Known keys come first in `METRICS` order; dict-valued ones get a row per
  entry; any other numeric key follows with a label made from its name.
  Missing keys get no row.
  """
  rows = []
  unknown = [k for k in metrics if k not in METRICS and k not in NOT_METRICS]
  section = SECTIONS[next(iter(SECTIONS))]
  for key in list(METRICS) + unknown:
    if key in SECTIONS:
      section = SECTIONS[key]
    elif key not in METRICS:
      section = OTHER_SECTION
    if key not in metrics:
      continue
    label, fmt, explanation = METRICS.get(key, (key.replace("_", " ").capitalize(), "float", ""))
    value = metrics[key]
    if isinstance(value, dict):
      for entry, v in value.items():
        if is_number(v):
          rows.append(MetricRow(section, key, f"{label}: {_entry_label(entry)}",
                                format_value(v, fmt), "", explanation))
    elif is_number(value) or (fmt == "text" and isinstance(value, str)):
      rows.append(MetricRow(section, key, label, format_value(value, fmt),
                            baseline_text(metrics, key, fmt), explanation))
  return rows


def _times(value: Any) -> str:
  return f"{value:.2f}×" if is_number(value) and math.isfinite(value) else "n/a"


def _pct(metrics: Mapping[str, Any], key: str) -> str:
  return format_value(metrics.get(key), "pct")


def headline(metrics: Mapping[str, Any]) -> str:
  """A few plain-text sentences with the run's main numbers, each beside its chance level."""
  has = lambda k: is_number(metrics.get(k))  # noqa: E731
  n = metrics.get("num_test")
  images = f"the {n} original test images" if is_number(n) else "the original test images"
  text = f"The classifier is {_pct(metrics, 'accuracy_original')} accurate on {images}"
  if has("accuracy_chance"):
    text += f" (chance {_pct(metrics, 'accuracy_chance')})"
  text += (f" and {_pct(metrics, 'accuracy_translated')} on their AG-CycleGAN translations "
           "to the other class")
  if has("flip_rate"):
    text += f"; translation flips {_pct(metrics, 'flip_rate')} of its predictions"
    if has("flip_rate_twin"):
      text += f" (the exact twins flip {_pct(metrics, 'flip_rate_twin')})"
  text += "."
  sentences = [text]

  if has("attention_truth_enrichment"):
    part = (f"Attention is {_times(metrics['attention_truth_enrichment'])} enriched on the "
            "true change")
    refs = []
    if has("cam_truth_enrichment"):
      refs.append(f"decision map {_times(metrics['cam_truth_enrichment'])}")
    if has("prior_truth_enrichment"):
      refs.append(f"prior {_times(metrics['prior_truth_enrichment'])}")
    refs.append("chance 1×")
    part += f" ({', '.join(refs)})"
    if has("counterfactual_error"):
      part += (f"; the counterfactual error is {format_value(metrics['counterfactual_error'])} "
               "(0 = the twin, 1 = doing nothing)")
    sentences.append(part + ".")
  elif has("counterfactual_error"):
    sentences.append(f"The counterfactual error is {format_value(metrics['counterfactual_error'])} "
                     "(0 = the twin, 1 = doing nothing).")

  if has("ctr_direction_correct") or has("ctr_direction_correct_model_free"):
    rulers = []
    if has("ctr_direction_correct"):
      rulers.append(f"{_pct(metrics, 'ctr_direction_correct')} (CTR regressor)")
    if has("ctr_direction_correct_model_free"):
      rulers.append(f"{_pct(metrics, 'ctr_direction_correct_model_free')} (model-free ruler)")
    part = f"The measured CTR moves the intended way in {' and '.join(rulers)} of translations"
    if has("direction_chance"):
      part += f"; chance {_pct(metrics, 'direction_chance')}"
    sentences.append(part + ".")

  if has("attention_box_enrichment"):
    part = (f"Attention mass in the radiologists' boxes is "
            f"{_times(metrics['attention_box_enrichment'])} the boxes' area share")
    refs = []
    if has("prior_box_enrichment"):
      refs.append(f"prior {_times(metrics['prior_box_enrichment'])}")
    refs.append("chance 1×")
    part += f" ({', '.join(refs)})"
    if has("attention_pointing"):
      part += (f"; the attention maximum lies in the box for {_pct(metrics, 'attention_pointing')} "
               "of boxed images")
      if has("fixed_point_pointing"):
        part += f" (a fixed point: {_pct(metrics, 'fixed_point_pointing')})"
    sentences.append(part + ".")
  sentences += audit_warnings(metrics)
  return " ".join(sentences)


def audit_warnings(metrics: Mapping[str, Any]) -> list[str]:
  """One sentence per audit accuracy well above its majority baseline (AUDIT_MARGIN)."""
  base = metrics.get("audit_majority_baseline")
  out = []
  for key, what in (("audit_outside_heart_accuracy", "image statistics outside the heart"),
                    ("audit_nonimage_accuracy", "non-image fields alone")):
    value = metrics.get(key)
    if is_number(value) and is_number(base) and value - base >= AUDIT_MARGIN:
      out.append(f"Caution: the label is predicted from {what} with {_pct(metrics, key)} "
                 f"accuracy (majority {_pct(metrics, 'audit_majority_baseline')}), so the "
                 "translations may show these differences rather than the disease.")
  return out


def confusion_html(matrix: Sequence[Sequence[float]] | None, class_names: Sequence[str],
                   caption: str) -> str:
  """A confusion matrix (rows = actual, columns = predicted) as an HTML table.

  Cells show the count and its share of the row.
  """
  esc = html.escape
  if matrix is None:
    return f"<p class='note'>{esc(caption)}: not in metrics.json.</p>"
  m = np.asarray(matrix, dtype=float)
  if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
    return f"<p class='note'>{esc(caption)}: malformed matrix {esc(str(matrix))}.</p>"
  head = "".join(f"<th>Predicted {esc(c)}</th>" for c in class_names)
  body = []
  for i, name in enumerate(class_names):
    total = m[i].sum()
    cells = []
    for j in range(len(class_names)):
      share = f" <span class='share'>({m[i, j] / total:.1%})</span>" if total else ""
      cls = " class='diag'" if i == j else ""
      cells.append(f"<td{cls}>{int(m[i, j]):d}{share}</td>")
    body.append(f"<tr><th>Actual {esc(name)}</th>{''.join(cells)}<td>{int(total):d}</td></tr>")
  return (f"<table class='confusion'><caption>{esc(caption)}</caption>"
          f"<tr><th></th>{head}<th>Total</th></tr>{''.join(body)}</table>")


def metric_table_html(metrics: Mapping[str, Any]) -> str:
  """The metric table: Metric | Value | Chance / baseline | Meaning, with section headings."""
  esc = html.escape
  out, section = [], None
  for row in metric_rows(metrics):
    if row.section != section:
      section = row.section
      out.append(f"<tr><th colspan='4' class='section'>{esc(section)}</th></tr>")
    out.append(f"<tr><td>{esc(row.label)}</td><td class='num'>{esc(row.value)}</td>"
               f"<td class='num base'>{esc(row.baseline)}</td>"
               f"<td class='expl'>{esc(row.explanation)}</td></tr>")
  return ("<table class='metrics'><tr><th>Metric</th><th>Value</th>"
          f"<th>Chance / baseline</th><th>Meaning</th></tr>{''.join(out)}</table>")


def cam_note(cam_kind: str) -> str:
  """The paragraph on which decision map is shown and why (plain text)."""
  kind = CAM_KIND_NOTES.get(cam_kind, f"This run shows the {cam_kind} map.")
  return f"{kind} {CAM_NOTE}"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 980px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
.meta { color: #666; margin-top: 0; }
.headline { font-size: 1.08em; background: #f4f6fa; border-left: 4px solid #4a6fa5;
            padding: 0.6em 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
th.section { background: #e6ebf3; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.base { color: #555; }
table.confusion td { text-align: right; font-variant-numeric: tabular-nums; }
table.confusion td.diag { background: #eaf4ea; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
.share, .note, .expl { color: #666; font-size: 0.92em; }
.matrices { display: flex; flex-wrap: wrap; gap: 2em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _figure_html(src: str | None, caption: str) -> str:
  esc = html.escape
  if src is None:
    return f"<p class='note'>{esc(caption)}</p>"
  return (f"<figure><img src=\"{esc(src, quote=True)}\" alt=\"{esc(caption, quote=True)}\">"
          f"<figcaption>{esc(caption)}</figcaption></figure>")


def write_report(workdir: str | os.PathLike) -> str:
  """Draws the figures into `<workdir>/figures/` and writes `<workdir>/report.html`.

  The page holds the run's headline numbers, a table of every metric beside
  its chance level or baseline with what it means, both confusion matrices
  (paper Table 2), the two translation figures (Fig. 4), the decision-map
  figure (Fig. 5) with a note on which map it is, training curves and the
  config. It links the figures by relative path and loads nothing from the
  network.

  Returns:
    The path of report.html.

  Raises:
    UserError: metrics.json or eval/examples.npz is missing (run `agcg
      evaluate` first) or unreadable.
  """
  workdir = os.fspath(workdir)
  metrics = wd.load_metrics(workdir)
  examples = wd.load_examples(workdir)
  figures_dir = wd.figures_dir(workdir)
  os.makedirs(figures_dir, exist_ok=True)

  def draw(name: str, make) -> str | None:
    fig = make(os.path.join(figures_dir, name))
    return None if fig is None else f"figures/{name}"

  translation = {d: draw(f"translation_{d}.png",
                         lambda p, d=d: figures.figure_translation(examples, d, p, cases=6))
                 for d in DIRECTION_NAMES}
  cam = draw("cam.png", lambda p: figures.figure_cam(examples, p))
  logs = wd.load_training_logs(workdir)
  curves = draw("training_curves.png", lambda p: figures.figure_training_curves(logs, p))

  esc = html.escape
  class_names = list(metrics.get("class_names") or CLASS_NAMES)
  dataset = metrics.get("dataset", "unknown")
  date = metrics.get("date") or datetime.date.today().isoformat()
  meta = [f"Date: {date}", f"Dataset: {dataset}"]
  if metrics.get("image_size") is not None:
    meta.append(f"Image size: {metrics['image_size']} px")
  if metrics.get("device"):
    meta.append(f"Device: {metrics['device']}")
  steps = [f"{name} step {metrics[key]}" for key, name in
           (("classifier_step", "classifier"), ("gan_step", "AG-CycleGAN"))
           if is_number(metrics.get(key))]
  if steps:
    meta.append(f"Checkpoints: {', '.join(steps)}")
  meta.append(f"Workdir: {os.path.abspath(workdir)}")
  cam_kind = str(metrics.get("cam_kind") or examples.cam_kind)

  config = metrics.get("config")
  config_html = (
      "<details><summary>Config</summary><pre>"
      f"{esc(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre></details>"
      if config is not None else "<p class='note'>No config in metrics.json.</p>")

  twin_note = (" Twin: the exact counterfactual (the phantom rendered with the other label); "
               "|Twin − Real|: the true change, on the same scale as Diff."
               if examples.twin is not None else "")
  sections = [
      "<h1>AG-CycleGAN explanation of a Cardiomegaly classifier</h1>",
      f"<p class='meta'>{' · '.join(esc(str(m)) for m in meta)}</p>",
      f"<p class='headline'>{esc(headline(metrics))}</p>",
      "<h2>Metrics</h2>",
      "<p class='note'>Each score stands beside what it must beat: its chance level, a "
      "baseline that knows only the dataset (the prior, a fixed point), or the reference a "
      "perfect translation would reach.</p>",
      metric_table_html(metrics),
      "<h2>Confusion matrices (paper Table 2)</h2>",
      "<p class='note'>Rows are the actual class (for translated images: the class of "
      "the source image), columns the classifier's prediction; percentages are shares "
      "of the row. In the paper's Table 2 the \"Positive\" row is No Finding and "
      "\"Negative\" is Cardiomegaly; the order here is the same.</p>",
      "<div class='matrices'>",
      confusion_html(metrics.get("confusion_original"), class_names, "(a) Original test data"),
      confusion_html(metrics.get("confusion_translated"), class_names,
                     "(b) Translated test data"),
      "</div>",
      "<h2>Translations (paper Fig. 4)</h2>",
      "<p class='note'>Real: original image; Attention: the attention map (0 = keep "
      "the pixel, 1 = replace it); Masked: attention × generator output; Fake: the "
      "translation A·G(x) + (1 − A)·x; Diff: fake − real (red = brighter after "
      f"translation, blue = darker).{twin_note} Red contours, where shown, are the heart "
      "outline of the original phantom. Row labels: id, the prediction on the real image "
      "(its probability) → on the translation, and the measured CTR before → after.</p>",
  ]
  for d, src in translation.items():
    sections.append(_figure_html(src, f"{' → '.join(DIRECTION_NAMES[d])} translation."))
  sections += [
      "<h2>Decision maps (paper Fig. 5)</h2>",
      f"<p class='note cam-kind'>{esc(cam_note(cam_kind))}</p>",
      _figure_html(cam, f"Decision maps ({cam_kind}) grouped by actual and predicted class, "
                        "overlaid on the image on one symmetric diverging scale; titles give "
                        "the predicted class's probability."),
      "<h2>Training curves</h2>",
      _figure_html(curves, "Losses and quality over training steps (faint: raw, solid: "
                           "moving average)." if curves else
                           "No training logs (classifier/, gan/, ctr/ metrics.jsonl) found."),
      "<h2>Configuration</h2>",
      config_html,
  ]
  page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
          f"<title>{esc(f'AG-CycleGAN report: {dataset}, {date}')}</title>"
          f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections) +
          "\n</body></html>\n")
  out = wd.report_html(workdir)
  files.write_text(out, page)
  return out
