"""Figures and the HTML page of one run, from what `agcg evaluate` wrote.

Inputs, all under the run's workdir:

  metrics.json           the evaluation metrics (see `METRICS`).
  eval/examples.npz      example translations (paper Fig. 4) and CAMs (Fig. 5).
  <stage>/metrics.jsonl  one JSON object per logged training step.

Outputs: `<workdir>/figures/*.png` and `<workdir>/report.html`, a page that
needs nothing but those files (no external CSS, JS or fonts).

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot,
so this module neither picks a backend nor leaks open figures; a notebook can
`display()` what the figure functions return.
"""
import datetime
import html
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from agcg_jax.errors import UserError

CLASS_NAMES = ("No Finding", "Cardiomegaly")
CLASS_KEYS = {"no_finding": "No Finding", "cardiomegaly": "Cardiomegaly"}
# Translation direction -> (source class, target class).
DIRECTIONS = {
    "to_cardiomegaly": ("No Finding", "Cardiomegaly"),
    "to_no_finding": ("Cardiomegaly", "No Finding"),
}
# The four blocks of paper Fig. 5, in its order: (true class, predicted class).
CAM_CELLS = (
    ("cardiomegaly", "cardiomegaly"),
    ("cardiomegaly", "no_finding"),
    ("no_finding", "cardiomegaly"),
    ("no_finding", "no_finding"),
)
TRAINING_STAGES = (("classifier", "Classifier"), ("gan", "AG-CycleGAN"),
                   ("ctr", "CTR regressor"))

DPI = 100
PANEL_IN = 1.7  # side of one image panel, inches
HEART_CONTOUR_COLOR = "#ff3b30"
CAM_ALPHA = 0.45

# Known metrics.json keys, in display order: key -> (label, format, explanation).
# Formats: "pct" (fraction shown as %), "float", "signed" (3 decimals with a
# sign), "int". Dict-valued keys (flip_rate, ctr_shift) are expanded per entry.
METRICS = {
    "num_test": ("Test images", "int", "Number of test images evaluated."),
    "accuracy_original": (
        "Accuracy, original", "pct",
        "Share of the original test images the classifier labels correctly."),
    "accuracy_translated": (
        "Accuracy, translated", "pct",
        "Share of translated test images still classified as their source class "
        "(labels are those of the source image). A translation that really "
        "changes the class drives this down; the paper went from 77.0% to 19.4%."),
    "flip_rate": (
        "Prediction flip rate", "pct",
        "Share of that class's test images whose predicted class changed after "
        "translation to the other class."),
    "attention_border_enrichment": (
        "Attention border enrichment", "float",
        "Share of attention mass in the band around the true heart border, divided "
        "by the band's share of the image; 1 = chance, higher = attention on the "
        "heart border."),
    "cam_border_enrichment": (
        "CAM border enrichment", "float",
        "The same ratio for the classifier's CAM (min-max normalised): CAM mass in "
        "the heart-border band over the band's share of the image; 1 = chance."),
    "cam_attention_pearson": (
        "CAM-attention correlation", "float",
        "Pearson correlation over pixels between the classifier's CAM and the "
        "translator's attention map (1 = same pattern, 0 = unrelated)."),
    "cam_margin_border_enrichment": (
        "Margin-CAM border enrichment", "float",
        "Border enrichment of the positive part of the margin CAM (CAM of the "
        "predicted class minus CAM of the other: the map whose mean is the "
        "decision's logit margin); 1 = chance."),
    "cam_margin_attention_pearson": (
        "Margin-CAM-attention correlation", "float",
        "Pearson correlation over pixels between the margin CAM and the attention "
        "map."),
    "border_band_area_share": (
        "Border band area", "pct",
        "Share of the image covered by the band around the true heart border "
        "(the chance level of the enrichment ratios)."),
    "ctr_crosses_threshold": (
        "CTR crosses 0.5", "pct",
        "Share of translated test images whose measured CTR ends on the target "
        "class's side of 0.5 (the phantoms' label threshold)."),
    "ctr_direction_correct": (
        "CTR moved the right way", "pct",
        "Share of translated test images whose measured cardiothoracic ratio moved "
        "in the intended direction (up towards Cardiomegaly, down towards No "
        "Finding)."),
    "ctr_shift": (
        "Mean CTR change", "signed",
        "Mean change of the measured cardiothoracic ratio (translated minus "
        "original) for this direction; should be positive towards Cardiomegaly "
        "and negative towards No Finding."),
    "ctr_regressor_mae": (
        "CTR regressor MAE", "float",
        "Mean absolute error of the CTR regressor (the measuring instrument for "
        "the CTR rows) on real test images, in CTR units."),
    "num_boxed": (
        "Boxed test images", "int",
        "Number of test images with a radiologist's Cardiomegaly bounding box "
        "(NIH BBox_List)."),
    "attention_in_box": (
        "Attention in box", "pct",
        "Share of attention mass inside the radiologist's bounding box, averaged "
        "over the boxed images."),
    "cam_in_box": (
        "CAM in box", "pct",
        "Share of (min-max normalised) CAM mass inside the radiologist's bounding "
        "box, averaged over the boxed images."),
    "attention_pointing": (
        "Attention pointing game", "pct",
        "Share of boxed images whose attention maximum lies inside the box."),
    "cam_pointing": (
        "CAM pointing game", "pct",
        "Share of boxed images whose CAM maximum lies inside the box."),
}
# Keys shown elsewhere on the page, never as metric rows.
NOT_METRICS = {"confusion_original", "confusion_translated", "class_names", "config",
               "dataset", "date", "device", "image_size"}


# ------------------------------------------------------------------- loading


def load_metrics(workdir: str | os.PathLike) -> dict[str, Any]:
  """The evaluation metrics of a run: `<workdir>/metrics.json` as a dict.

  Raises:
    UserError: the file is missing or is not a JSON object.
  """
  path = os.path.join(workdir, "metrics.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: run `agcg evaluate` first")
  try:
    with open(path) as f:
      metrics = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}): run `agcg evaluate` again") from e
  if not isinstance(metrics, dict):
    raise UserError(f"{path} is not a JSON object: run `agcg evaluate` again")
  return metrics


def load_examples(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The example arrays of a run: `<workdir>/eval/examples.npz` as a dict.

  Images come back as [N, S, S] (a trailing channel axis of size 1 is
  dropped); ids as unicode arrays [N]. No pickles are loaded.

  Raises:
    UserError: the file is missing or unreadable.
  """
  path = os.path.join(workdir, "eval", "examples.npz")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: run `agcg evaluate` first")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}): run `agcg evaluate` again") from e
  return {k: (a[..., 0] if a.ndim == 4 and a.shape[-1] == 1 else a)
          for k, a in arrays.items()}


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl file; lines that do not parse (cut short by a kill) are skipped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


# ------------------------------------------------------------------- figures


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
  if path is not None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=DPI)


def _select(n: int, cases: int | Sequence[int] | None) -> list[int]:
  """Row indices: all (None), the first `cases` (int), or the given indices."""
  if cases is None:
    return list(range(n))
  if isinstance(cases, (int, np.integer)):
    return list(range(min(int(cases), n)))
  return [int(i) for i in cases if 0 <= int(i) < n]


def _bare(ax) -> None:
  """An image panel: no ticks, no frame (ylabel still shows, unlike axis('off'))."""
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(False)


def _message_figure(text: str, title: str, path) -> Figure:
  fig = Figure(figsize=(5, 1.2), dpi=DPI)
  fig.suptitle(title, fontsize=10)
  fig.text(0.5, 0.4, text, ha="center", va="center", fontsize=9, color="0.35")
  _save(fig, path)
  return fig


def figure_translation(examples: Mapping[str, np.ndarray], direction: str,
                       path: str | os.PathLike | None = None, *,
                       cases: int | Sequence[int] | None = None) -> Figure:
  """Paper Fig. 4 for one direction: Real | Attention | Masked | Fake | Diff.

  Args:
    examples: arrays as from `load_examples`; uses `{direction}_real`,
      `_attention`, `_generated`, `_fake` [N, S, S], `_id` [N] and, when
      present, `_ctr_real`, `_ctr_fake` [N] (row labels "CTR a → b") and
      `_heart_mask` [N, S, S] (true heart contour on Real and Attention).
      Images are in [-1, 1], attention in [0, 1].
    direction: "to_cardiomegaly" (sources are No Finding) or "to_no_finding".
    path: where to write the PNG, or None to only return the figure.
    cases: rows to show: None = all, an int = the first that many, or indices.

  Returns:
    The figure, one row per example. Masked = attention * generated; Diff =
    fake - real on a diverging map symmetric around 0, red = brighter after
    translation, blue = darker.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
  source, target = DIRECTIONS[direction]
  title = f"{source} → {target}"
  real = examples.get(f"{direction}_real")
  if real is None or len(real) == 0:
    return _message_figure("no examples of this direction in eval/examples.npz", title, path)
  rows = _select(len(real), cases)
  if not rows:
    return _message_figure("no examples selected", title, path)
  real = real[rows]
  attention = examples[f"{direction}_attention"][rows]
  generated = examples[f"{direction}_generated"][rows]
  fake = examples[f"{direction}_fake"][rows]
  ids = examples.get(f"{direction}_id")
  ctr_real = examples.get(f"{direction}_ctr_real")
  ctr_fake = examples.get(f"{direction}_ctr_fake")
  heart = examples.get(f"{direction}_heart_mask")
  masked = attention * generated
  diff = fake - real
  # One symmetric scale for the whole column, so rows compare; the 99.5th
  # percentile keeps a few extreme pixels from washing the rest out.
  vmax = max(float(np.percentile(np.abs(diff), 99.5)), 1e-3)

  columns = ("Real", "Attention", "Masked", "Fake", "Diff")
  panel = _panel_inches(real.shape[-1])
  fig = Figure(figsize=(len(columns) * panel + 0.9, len(rows) * panel + 0.5),
               dpi=DPI, layout="constrained")
  fig.suptitle(title, fontsize=11)
  axes = fig.subplots(len(rows), len(columns), squeeze=False)
  diff_image = None
  for r, i in enumerate(rows):
    panels = (
        (real[r], dict(cmap="gray", vmin=-1, vmax=1)),
        (attention[r], dict(cmap="viridis", vmin=0, vmax=1)),
        (masked[r], dict(cmap="gray", vmin=-1, vmax=1)),
        (fake[r], dict(cmap="gray", vmin=-1, vmax=1)),
        (diff[r], dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
    )
    for c, (image, style) in enumerate(panels):
      ax = axes[r, c]
      shown = ax.imshow(image, interpolation="nearest", **style)
      _bare(ax)
      if r == 0:
        ax.set_title(columns[c], fontsize=10)
      if c == 4:
        diff_image = shown
      if heart is not None and c in (0, 1) and np.any(heart[i] > 0.5):
        ax.contour(heart[i], levels=[0.5], colors=HEART_CONTOUR_COLOR, linewidths=0.8)
    label = []
    if ids is not None:
      label.append(_short(str(ids[i])))
    if ctr_real is not None and ctr_fake is not None:
      label.append(f"CTR {float(ctr_real[i]):.2f} → {float(ctr_fake[i]):.2f}")
    if label:
      axes[r, 0].set_ylabel("\n".join(label), fontsize=8)
  bar = fig.colorbar(diff_image, ax=axes[:, 4], shrink=0.8 if len(rows) > 1 else 1.0,
                     aspect=25)
  bar.set_label("fake − real", fontsize=8)
  bar.ax.tick_params(labelsize=7)
  _save(fig, path)
  return fig


def _panel_inches(size: int) -> float:
  """Panel side for S-pixel images: about one figure pixel per image pixel, within limits."""
  return min(max(size / DPI, PANEL_IN), 2.6)


def _short(text: str, width: int = 22) -> str:
  return text if len(text) <= width else "…" + text[-(width - 1):]


def _normalize01(cam: np.ndarray) -> np.ndarray:
  """[S, S] -> [S, S] min-max scaled to [0, 1]; a constant map becomes 0."""
  lo, hi = float(np.min(cam)), float(np.max(cam))
  return (cam - lo) / max(hi - lo, 1e-12)


def figure_cam(examples: Mapping[str, np.ndarray],
               path: str | os.PathLike | None = None, *,
               per_cell: int = 3) -> Figure:
  """Paper Fig. 5: CAMs of the predicted class in four blocks (true x predicted).

  Blocks, top to bottom: (a) Cardiomegaly predicted Cardiomegaly, (b)
  Cardiomegaly predicted No Finding, (c) No Finding predicted Cardiomegaly,
  (d) No Finding predicted No Finding. Each shows up to `per_cell` images
  ([-1, 1], gray) with their CAM ([S, S] raw, min-max normalised per image)
  overlaid in jet, titled with the predicted class's probability. An empty
  block says so.

  Args:
    examples: arrays as from `load_examples`; uses `cam_{true}_as_{pred}_image`,
      `_cam` [n, S, S], `_prob` [n] and `_id` [n] (n may be 0).
    path: where to write the PNG, or None to only return the figure.
    per_cell: images per block.

  Returns:
    The figure.
  """
  counts = [len(examples.get(f"cam_{t}_as_{p}_image", ())) for t, p in CAM_CELLS]
  cols = max(min(int(per_cell), max(counts)), 1)
  sizes = [examples[f"cam_{t}_as_{p}_image"].shape[-1] for (t, p), n in zip(CAM_CELLS, counts)
           if n]
  panel = _panel_inches(max(sizes, default=0))
  # An empty block gets a short row with a note instead of a row of blank panels.
  heights = [panel + 0.55 if n else 0.6 for n in counts]
  fig = Figure(figsize=(max(cols * panel, 3.6) + 0.3, sum(heights) + 0.4), dpi=DPI,
               layout="constrained")
  fig.suptitle("Class activation maps of the predicted class", fontsize=11)
  blocks = fig.subfigures(4, 1, height_ratios=heights)
  for letter, block, (true, pred), count in zip("abcd", blocks, CAM_CELLS, counts):
    key = f"cam_{true}_as_{pred}"
    block.suptitle(f"({letter}) Label: {CLASS_KEYS[true]}, Predicted: {CLASS_KEYS[pred]}",
                   fontsize=9.5)
    if count == 0:
      block.text(0.5, 0.3, "no such case in the test set", ha="center", va="center",
                 fontsize=9, color="0.4")
      continue
    images = examples[f"{key}_image"]
    n = min(count, cols)
    axes = block.subplots(1, cols, squeeze=False)[0]
    for j, ax in enumerate(axes):
      _bare(ax)
      if j >= n:
        continue
      ax.imshow(images[j], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
      ax.imshow(_normalize01(examples[f"{key}_cam"][j]), cmap="jet", vmin=0, vmax=1,
                alpha=CAM_ALPHA, interpolation="bilinear")
      probs = examples.get(f"{key}_prob")
      if probs is not None:
        ax.set_title(f"P({CLASS_KEYS[pred]}) = {float(probs[j]):.2f}", fontsize=8)
      ids = examples.get(f"{key}_id")
      if ids is not None:
        ax.set_xlabel(_short(str(ids[j]), 20), fontsize=7)
  _save(fig, path)
  return fig


def _panel_of(key: str) -> str | None:
  """Which training-curve panel a metrics.jsonl field goes to (None = not plotted)."""
  if key == "step" or key.endswith("_per_s") or key in ("time", "lr", "learning_rate"):
    return None
  if key == "loss" or key.endswith("_loss"):
    return "loss"
  if key.startswith("grad_norm"):
    return "gradient norm"
  if key.startswith("attention"):
    return "attention mean"
  if key in ("accuracy", "mae") or key.startswith(("accuracy", "mae")):
    return "quality"
  if key.startswith("d_"):
    return "discriminator terms"
  return "loss terms"


def _legend_label(key: str, panel: str) -> str:
  """A field's name without the prefix its panel title already says."""
  prefix = {"attention mean": "attention_mean_", "gradient norm": "grad_norm_"}.get(panel)
  return key[len(prefix):] if prefix and key.startswith(prefix) else key


_PLAIN = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
PANEL_ORDER = ("loss", "loss terms", "discriminator terms", "quality", "attention mean",
               "gradient norm")


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
  """Trailing moving average over n points (shorter at the start)."""
  c = np.cumsum(np.insert(np.nan_to_num(y), 0, 0.0))
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(idx - n, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def figure_training_curves(workdir: str | os.PathLike,
                           path: str | os.PathLike | None = None) -> Figure | None:
  """Training curves from `<workdir>/{classifier,gan,ctr}/metrics.jsonl`.

  One row per stage that has a log, one panel per kind of field: totals
  (`loss`, `*_loss`), other loss terms, discriminator terms (`d_*`), quality
  (`accuracy`, `mae`), attention means and gradient norms (log scale). Absent files are skipped.
  Noisy curves (more than 30 points) are drawn faint with a moving average.

  Returns:
    The figure, or None when no stage has a log (nothing is written then).
  """
  stages = []
  for name, title in TRAINING_STAGES:
    log = os.path.join(workdir, name, "metrics.jsonl")
    if not os.path.isfile(log):
      continue
    rows = [r for r in load_jsonl(log) if isinstance(r.get("step"), (int, float))]
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    keys = sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
      panel = _panel_of(key)
      if panel is None:
        continue
      pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
      steps, values = np.array(pts, dtype=float).T
      panels.setdefault(panel, {})[key] = (steps, values)
    if panels:
      stages.append((title, [(p, panels[p]) for p in PANEL_ORDER if p in panels]))
  if not stages:
    return None

  cols = max(len(p) for _, p in stages)
  fig = Figure(figsize=(cols * 2.8, len(stages) * 3.0 + 0.3), dpi=DPI, layout="constrained")
  fig.suptitle("Training curves", fontsize=11)
  axes = fig.subplots(len(stages), cols, squeeze=False)
  for r, (title, panels) in enumerate(stages):
    for c in range(cols):
      ax = axes[r, c]
      if c >= len(panels):
        ax.set_visible(False)
        continue
      panel, series = panels[c]
      for k, (key, (steps, values)) in enumerate(series.items()):
        color = f"C{k % 10}"
        key = _legend_label(key, panel)
        if len(values) > 30:
          ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.6)
          ax.plot(steps, _smooth(values, max(len(values) // 20, 2)), color=color,
                  linewidth=1.2, label=key)
        else:
          ax.plot(steps, values, color=color, linewidth=1.2, marker=".", markersize=3,
                  label=key)
      if panel == "gradient norm" and all(np.all(v[np.isfinite(v)] > 0)
                                          for _, v in series.values()):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN)
      ax.set_title(f"{title}: {panel}", fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.tick_params(which="both", labelsize=7)
      ax.grid(alpha=0.3, linewidth=0.5)
      # Below the panel: noisy GAN curves leave no free corner inside it.
      ax.legend(fontsize=6.5, ncols=2, frameon=False, loc="upper center",
                bbox_to_anchor=(0.5, -0.2), handlelength=1.2, columnspacing=0.8)
  _save(fig, path)
  return fig


# ------------------------------------------------------------ text and HTML


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_value(value: Any, fmt: str = "float") -> str:
  """A metric value as text: "pct" -> "77.0%", "int", "signed" -> "+0.031", "float" -> "1.234"."""
  if not _is_number(value):
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
  if entry in DIRECTIONS:
    return " → ".join(DIRECTIONS[entry])
  return CLASS_KEYS.get(entry, entry)


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
  """Every numeric metric as (label, formatted value, one-line explanation).

  Known keys come first in `METRICS` order; dict-valued ones get a row per
  entry; any other numeric key follows with a label made from its name.
  """
  rows = []
  unknown = [k for k in metrics if k not in METRICS and k not in NOT_METRICS]
  for key in list(METRICS) + unknown:
    if key not in metrics:
      continue
    label, fmt, explanation = METRICS.get(key, (key.replace("_", " ").capitalize(), "float", ""))
    value = metrics[key]
    if isinstance(value, dict):
      for entry, v in value.items():
        if _is_number(v):
          rows.append((f"{label}: {_entry_label(entry)}", format_value(v, fmt),
                       explanation))
    elif _is_number(value):
      rows.append((label, format_value(value, fmt), explanation))
  return rows


def _times(value: Any) -> str:
  text = format_value(value)
  return text if text == "n/a" or not _is_number(value) else f"{value:.2f}×"


def headline(metrics: Mapping[str, Any]) -> str:
  """One or two plain-text sentences with the run's main numbers."""
  n = metrics.get("num_test")
  images = f"the {n} original test images" if _is_number(n) else "the original test images"
  text = (f"The classifier is {format_value(metrics.get('accuracy_original'), 'pct')} "
          f"accurate on {images} and "
          f"{format_value(metrics.get('accuracy_translated'), 'pct')} on their "
          f"AG-CycleGAN translations to the other class")
  flips = metrics.get("flip_rate")
  if isinstance(flips, dict) and flips:
    parts = [f"{format_value(v, 'pct')} of {CLASS_KEYS.get(k, k)}" for k, v in flips.items()]
    text += f"; translation flips the prediction for {' and '.join(parts)} images"
  text += "."
  extra = []
  if "ctr_direction_correct" in metrics:
    extra.append(f"the measured CTR moves the intended way for "
                 f"{format_value(metrics['ctr_direction_correct'], 'pct')} of translations")
  if "attention_border_enrichment" in metrics:
    extra.append(f"attention is {_times(metrics['attention_border_enrichment'])} "
                 f"enriched on the heart border (CAM: "
                 f"{_times(metrics.get('cam_border_enrichment'))}; 1× = chance)")
  if "attention_in_box" in metrics:
    extra.append(f"{format_value(metrics['attention_in_box'], 'pct')} of attention "
                 f"(CAM: {format_value(metrics.get('cam_in_box'), 'pct')}) falls in the "
                 f"radiologists' boxes")
  if extra:
    sentence = "; ".join(extra)
    text += " " + sentence[0].upper() + sentence[1:] + "."
  return text


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
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
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

  The page holds the run's headline numbers, a table of every numeric metric
  with what it means, both confusion matrices (paper Table 2), flip rates,
  the two translation figures (Fig. 4), the CAM figure (Fig. 5), training
  curves and the config. It links the figures by relative path and loads
  nothing from the network.

  Returns:
    The path of report.html.

  Raises:
    UserError: metrics.json or eval/examples.npz is missing (run `agcg
      evaluate` first) or unreadable.
  """
  workdir = os.fspath(workdir)
  metrics = load_metrics(workdir)
  examples = load_examples(workdir)
  figures_dir = os.path.join(workdir, "figures")
  os.makedirs(figures_dir, exist_ok=True)

  def draw(name: str, make) -> str | None:
    fig = make(os.path.join(figures_dir, name))
    return None if fig is None else f"figures/{name}"

  translation = {d: draw(f"translation_{d}.png",
                         lambda p, d=d: figure_translation(examples, d, p, cases=6))
                 for d in DIRECTIONS}
  cam = draw("cam.png", lambda p: figure_cam(examples, p))
  curves = draw("training_curves.png", lambda p: figure_training_curves(workdir, p))

  esc = html.escape
  class_names = list(metrics.get("class_names") or CLASS_NAMES)
  dataset = metrics.get("dataset", "unknown")
  date = metrics.get("date") or datetime.date.today().isoformat()
  meta = [f"Date: {date}", f"Dataset: {dataset}"]
  if metrics.get("image_size") is not None:
    meta.append(f"Image size: {metrics['image_size']} px")
  if metrics.get("device"):
    meta.append(f"Device: {metrics['device']}")
  meta.append(f"Workdir: {os.path.abspath(workdir)}")

  metric_table = "".join(
      f"<tr><td>{esc(label)}</td><td class='num'>{esc(value)}</td>"
      f"<td class='expl'>{esc(expl)}</td></tr>"
      for label, value, expl in metric_rows(metrics))

  flips = metrics.get("flip_rate")
  if isinstance(flips, dict) and flips:
    flip_rows = "".join(
        f"<tr><td>{esc(CLASS_KEYS.get(k, k))} → {esc(_other(CLASS_KEYS.get(k, k)))}</td>"
        f"<td class='num'>{esc(format_value(v, 'pct'))}</td></tr>"
        for k, v in flips.items())
    flip_html = (f"<table><caption>Prediction flips after translation</caption>"
                 f"<tr><th>Source class → target</th><th>Share flipped</th></tr>"
                 f"{flip_rows}</table>")
  else:
    flip_html = "<p class='note'>No flip rates in metrics.json.</p>"

  config = metrics.get("config")
  config_html = (
      "<details><summary>Config</summary><pre>"
      f"{esc(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre></details>"
      if config is not None else "<p class='note'>No config in metrics.json.</p>")

  sections = [
      "<h1>AG-CycleGAN explanation of a Cardiomegaly classifier</h1>",
      f"<p class='meta'>{' · '.join(esc(str(m)) for m in meta)}</p>",
      f"<p class='headline'>{esc(headline(metrics))}</p>",
      "<h2>Metrics</h2>",
      "<table><tr><th>Metric</th><th>Value</th><th>Meaning</th></tr>"
      f"{metric_table}</table>",
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
      flip_html,
      "<h2>Translations (paper Fig. 4)</h2>",
      "<p class='note'>Real: original image; Attention: the attention map (0 = keep "
      "the pixel, 1 = replace it); Masked: attention × generator output; Fake: the "
      "translation A·G(x) + (1 − A)·x; Diff: fake − real (red = brighter after "
      "translation, blue = darker). Red contours, where shown, are the true heart "
      "outline of the phantom.</p>",
  ]
  for d, src in translation.items():
    sections.append(_figure_html(src, f"{' → '.join(DIRECTIONS[d])} translation."))
  sections += [
      "<h2>Class activation maps (paper Fig. 5)</h2>",
      _figure_html(cam, "CAM of the predicted class (min-max normalised per image, jet "
                        "overlay), grouped by actual and predicted class; titles give "
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
  out = os.path.join(workdir, "report.html")
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(page)
  os.replace(tmp, out)
  return out


def _other(class_name: str) -> str:
  return {"No Finding": "Cardiomegaly", "Cardiomegaly": "No Finding"}.get(class_name, "?")
