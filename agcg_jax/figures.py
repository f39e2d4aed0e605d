"""The figures of a run: paper Fig. 4 (translations), Fig. 5 (decision maps), training curves.

Every function draws on a `matplotlib.figure.Figure` and returns it, never
through pyplot, so this module neither picks a backend nor leaks open
figures; a notebook can `display()` what it returns. Example cases come as
one `examples.ExampleMaps`; reading files is `report`'s job.
"""
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps, colors, ticker
from matplotlib.figure import Figure

from agcg_jax.data.records import CLASS_NAMES, DIRECTION_NAMES  # noqa: F401  (re-exported)
from agcg_jax.examples import ExampleMaps
SHORT_NAMES = {0: "NF", 1: "CM"}  # row labels are narrow
# The four blocks of paper Fig. 5, in its order: (true class, predicted class).
CAM_CELLS = ((1, 1), (1, 0), (0, 1), (0, 0))
# What each decision-map kind (cam.CAM_KINDS) is, as a title.
CAM_KIND_TITLES = {
    "margin": "margin CAM (predicted class minus the other)",
    "equ9": "Equ. 9 CAM of the predicted class",
}
TRAINING_STAGES = {"classifier": "Classifier", "gan": "AG-CycleGAN", "ctr": "CTR regressor"}

DPI = 100
PANEL_IN = 1.7  # side of one image panel, inches
HEART_CONTOUR_COLOR = "#ff3b30"
CAM_HEART_CONTOUR_COLOR = "#00b050"  # red and blue are taken by the map
CAM_ALPHA = 0.85  # opacity of the overlay at the ends of its scale
CAM_CMAP = "RdBu_r"
DIFF_CMAP = "RdBu_r"
TRUTH_CMAP = "magma"
# Colour limits: the 99.5th percentile of |values| over the figure, so a few
# extreme pixels do not wash out the rest.
LIMIT_PERCENTILE = 99.5


# ------------------------------------------------------------------- helpers


def is_number(v: Any) -> bool:
  """A JSON number (int or float, not bool)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def _panel_inches(size: int) -> float:
  """Panel side for S-pixel images: about one figure pixel per image pixel, within limits."""
  return min(max(size / DPI, PANEL_IN), 2.6)


def _short(text: str, width: int = 22) -> str:
  return text if len(text) <= width else "…" + text[-(width - 1):]


def symmetric_limit(*maps: np.ndarray | None) -> float:
  """One colour limit v for all `maps` (shown on [-v, v]): the 99.5th percentile of |values|.

  Never below 1e-6, so an all-zero map still gets a valid scale.
  """
  values = [np.abs(np.asarray(m, np.float32)).ravel() for m in maps if m is not None and np.size(m)]
  if not values:
    return 1e-6
  return max(float(np.percentile(np.concatenate(values), LIMIT_PERCENTILE)), 1e-6)


def signed_overlay_cmap(name: str = CAM_CMAP, alpha: float = CAM_ALPHA) -> colors.Colormap:
  """A diverging colormap whose opacity grows with |value|: 0 at the centre, `alpha` at the ends.

  Overlaid on an image, a map near 0 leaves the image visible instead of
  washing it out with the colormap's neutral white.
  """
  base = colormaps[name]
  table = base(np.linspace(0.0, 1.0, 256))
  table[:, 3] = alpha * np.abs(np.linspace(-1.0, 1.0, 256)) ** 0.7
  return colors.ListedColormap(table, name=f"{name}_fading")


def _has_heart(examples: ExampleMaps, i: int) -> bool:
  return examples.heart_mask is not None and bool(np.any(examples.heart_mask[i] > 0.5))


def _row_label(examples: ExampleMaps, i: int) -> str:
  """id; prediction on the real image (its probability) -> on the translation; CTR a -> b."""
  lines = [_short(str(examples.id[i]))]
  pred, pred_t = int(examples.pred[i]), int(examples.pred_translated[i])
  lines.append(f"pred {SHORT_NAMES.get(pred, pred)} {float(examples.prob[i]):.2f}"
               f" → {SHORT_NAMES.get(pred_t, pred_t)}")
  ctr_real, ctr_fake = float(examples.ctr_real[i]), float(examples.ctr_fake[i])
  if np.isfinite(ctr_real) and np.isfinite(ctr_fake):
    lines.append(f"CTR {ctr_real:.2f} → {ctr_fake:.2f}")
  return "\n".join(lines)


# ------------------------------------------------------------------- figures


def translation_columns(has_twin: bool) -> tuple[str, ...]:
  """Column titles of `figure_translation`: the paper's five, the twin's two beside theirs."""
  if has_twin:
    return ("Real", "Attention", "Masked", "Fake", "Twin", "Diff", "|Twin − Real|")
  return ("Real", "Attention", "Masked", "Fake", "Diff")


def figure_translation(examples: ExampleMaps, direction: str,
                       path: str | os.PathLike | None = None, *,
                       cases: int | Sequence[int] | None = None) -> Figure:
  """Paper Fig. 4 for one direction: Real | Attention | Masked | Fake | Diff.

  Where the examples have the exact counterfactual (`twin`, phantoms), a
  "Twin" column stands beside Fake and "|Twin − Real|" (the true change)
  beside Diff, so the truth sits next to the translation.

  Args:
    examples: the example cases; those with `direction` are shown. Images
      are in [-1, 1], attention in [0, 1]. Row labels give the id, the
      prediction on the real image (its probability) and on the translation,
      and the measured CTR before and after where finite. `heart_mask`, when
      present, is drawn as a red contour (the original heart outline) on
      Real, Attention, Fake and Twin.
    direction: "to_cardiomegaly" (sources are No Finding) or "to_no_finding".
    path: where to write the PNG, or None to only return the figure.
    cases: rows among that direction's cases: None = all, an int = the first
      that many, or indices.

  Returns:
    The figure, one row per case. Masked = attention * generated; Diff =
    fake - real on a diverging map symmetric around 0 (red = brighter after
    translation, blue = darker); |Twin − Real| on the same scale as Diff, so
    the sizes of the two changes compare.
  """
  if direction not in DIRECTION_NAMES:
    raise ValueError(f"direction must be one of {sorted(DIRECTION_NAMES)}, got {direction!r}")
  source, target = DIRECTION_NAMES[direction]
  index = examples.where(direction=direction)
  # Images of unknown class (`agcg explain`) have no source class to name.
  known = len(index) == 0 or bool(np.any(examples.label[index] >= 0))
  title = f"{source} → {target}" if known else f"Translated to {target}"
  if len(index) == 0:
    return _message_figure("no examples of this direction", title, path)
  rows = _select(len(index), cases)
  if not rows:
    return _message_figure("no examples selected", title, path)
  ex = examples.take(index[rows])
  has_twin = ex.twin is not None
  masked = ex.attention * ex.generated
  diff = ex.fake - ex.real
  truth = np.abs(ex.twin - ex.real) if has_twin else None
  # One scale for the whole figure, so rows and the two changes compare.
  vmax = symmetric_limit(diff, truth)

  columns = translation_columns(has_twin)
  gray = dict(cmap="gray", vmin=-1, vmax=1)
  panel = _panel_inches(ex.size)
  fig = Figure(figsize=(len(columns) * panel + (1.8 if has_twin else 0.9),
                        len(ex) * panel + 0.5), dpi=DPI, layout="constrained")
  fig.suptitle(title, fontsize=11)
  axes = fig.subplots(len(ex), len(columns), squeeze=False)
  shown_by_column = {}
  for r in range(len(ex)):
    maps = {
        "Real": (ex.real[r], gray),
        "Attention": (ex.attention[r], dict(cmap="viridis", vmin=0, vmax=1)),
        "Masked": (masked[r], gray),
        "Fake": (ex.fake[r], gray),
        "Diff": (diff[r], dict(cmap=DIFF_CMAP, vmin=-vmax, vmax=vmax)),
    }
    if has_twin:
      maps["Twin"] = (ex.twin[r], gray)
      maps["|Twin − Real|"] = (truth[r], dict(cmap=TRUTH_CMAP, vmin=0, vmax=vmax))
    for c, name in enumerate(columns):
      image, style = maps[name]
      ax = axes[r, c]
      shown_by_column[name] = ax.imshow(image, interpolation="nearest", **style)
      _bare(ax)
      if r == 0:
        ax.set_title(name, fontsize=10)
      if name in ("Real", "Attention", "Fake", "Twin") and _has_heart(ex, r):
        ax.contour(ex.heart_mask[r], levels=[0.5], colors=HEART_CONTOUR_COLOR, linewidths=0.8)
    axes[r, 0].set_ylabel(_row_label(ex, r), fontsize=8)
  shrink = 0.8 if len(ex) > 1 else 1.0
  bars = [("Diff", "fake − real")] + ([("|Twin − Real|", "|twin − real|")] if has_twin else [])
  for name, label in bars:
    c = columns.index(name)
    bar = fig.colorbar(shown_by_column[name], ax=axes[:, c], shrink=shrink, aspect=25)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
  _save(fig, path)
  return fig


def figure_cam(examples: ExampleMaps, path: str | os.PathLike | None = None, *,
               per_cell: int = 3) -> Figure:
  """Paper Fig. 5: the classifier's decision maps in four blocks (true x predicted class).

  Blocks, top to bottom: (a) Cardiomegaly predicted Cardiomegaly, (b)
  Cardiomegaly predicted No Finding, (c) No Finding predicted Cardiomegaly,
  (d) No Finding predicted No Finding; each shows up to `per_cell` cases
  (`examples.where(label=, pred=)`), the image in gray with `examples.cam`
  overlaid. The map is signed, so it is drawn raw on a diverging map centred
  on 0, with one symmetric scale for the whole figure (no per-image
  normalisation, which would invent a hot spot on every image): red = for
  the predicted class, blue = against it. Titles give the predicted class's
  probability; the figure's title names `examples.cam_kind`. Heart contours
  (green) where the examples have them. An empty block says so.

  Returns:
    The figure.
  """
  picks = [examples.where(label=t, pred=p)[:max(int(per_cell), 0)] for t, p in CAM_CELLS]
  counts = [len(i) for i in picks]
  cols = max(max(counts), 1)
  shown = [examples.cam[i] for i in picks if len(i)]
  vmax = symmetric_limit(*shown)
  panel = _panel_inches(examples.size)
  # An empty block gets a short row with a note instead of a row of blank panels.
  heights = [panel + 0.55 if n else 0.6 for n in counts]
  fig = Figure(figsize=(max(cols * panel, 3.6) + 1.0, sum(heights) + 0.5), dpi=DPI,
               layout="constrained")
  kind = CAM_KIND_TITLES.get(examples.cam_kind, f"{examples.cam_kind} map")
  fig.suptitle(f"Decision maps: {kind}", fontsize=11)
  blocks = fig.subfigures(4, 1, height_ratios=heights)
  cmap = signed_overlay_cmap()
  for letter, block, (true, pred), index in zip("abcd", blocks, CAM_CELLS, picks):
    block.suptitle(f"({letter}) Label: {CLASS_NAMES[true]}, Predicted: {CLASS_NAMES[pred]}",
                   fontsize=9.5)
    if not len(index):
      block.text(0.5, 0.3, "no such case in the test set", ha="center", va="center",
                 fontsize=9, color="0.4")
      continue
    axes = block.subplots(1, cols, squeeze=False)[0]
    overlay = None
    for j, ax in enumerate(axes):
      _bare(ax)
      if j >= len(index):
        continue
      i = int(index[j])
      ax.imshow(examples.real[i], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
      overlay = ax.imshow(examples.cam[i], cmap=cmap, vmin=-vmax, vmax=vmax,
                          interpolation="bilinear")
      if _has_heart(examples, i):
        ax.contour(examples.heart_mask[i], levels=[0.5], colors=CAM_HEART_CONTOUR_COLOR,
                   linewidths=0.7)
      ax.set_title(f"P({CLASS_NAMES[pred]}) = {float(examples.prob[i]):.2f}", fontsize=8)
      ax.set_xlabel(_short(str(examples.id[i]), 20), fontsize=7)
    # The same scale in every block; a bar in each keeps the panels the same size.
    bar = block.colorbar(overlay, ax=axes, shrink=0.9, aspect=15)
    bar.set_label(examples.cam_kind, fontsize=8)
    bar.ax.tick_params(labelsize=7)
  _save(fig, path)
  return fig


# ------------------------------------------------------------ training curves


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


def figure_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]],
                           path: str | os.PathLike | None = None) -> Figure | None:
  """Training curves: one row per stage, one panel per kind of field.

  Args:
    logs: stage name ("classifier", "gan", "ctr") -> its logged rows (dicts
      with a numeric "step"), as `report.load_training_logs` returns.
    path: where to write the PNG, or None to only return the figure.

  Panels: totals (`loss`, `*_loss`), other loss terms, discriminator terms
  (`d_*`), quality (`accuracy`, `mae`), attention means and gradient norms
  (log scale). Noisy curves (more than 30 points) are drawn faint with a
  moving average.

  Returns:
    The figure, or None when no stage has a plottable row (nothing is written then).
  """
  stages = []
  for name, rows in logs.items():
    rows = [r for r in rows if is_number(r.get("step"))]
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    keys = sorted({k for r in rows for k, v in r.items() if is_number(v)})
    for key in keys:
      panel = _panel_of(key)
      if panel is None:
        continue
      pts = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
      steps, values = np.array(pts, dtype=float).T
      panels.setdefault(panel, {})[key] = (steps, values)
    if panels:
      stages.append((TRAINING_STAGES.get(name, name),
                     [(p, panels[p]) for p in PANEL_ORDER if p in panels]))
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
