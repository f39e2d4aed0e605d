"""A model-free cardiothoracic ratio (CTR) ruler for frontal chest radiographs.

`silhouette_ctr(images)` reads the CTR straight off the image, as a reader
with a ruler would, with no trained network: the independent check that a
translated image's heart really grew (No Finding -> Cardiomegaly) or shrank.
It is pure jnp, batched and jit-able (no host callbacks, no Python loop over
pixels or rows), so it runs inside a jitted evaluation on CPU, GPU or TPU.
Each image is measured on its own (no statistic is shared across the batch).

Method, per image (images in [-1, 1], bright = dense):

1. Clean: a grey opening (min then max filter over a (2r+1)^2 square,
   r = max(1, round(S / 48))) erases bright structures thinner than the
   square (ECG wires, electrodes, ribs, vessel streaks; also any chest wall
   that thin); then, at S >= 48, a 1x3 box blur along rows against noise
   (along rows only: every measurement is along a row, and vertical blur
   would smear lung corners into the borders; at 32 px blur costs more edge
   than it saves noise).
2. Classes: a two-threshold Otsu over a 64-bin histogram gives air
   (background and lungs) < t1 <= soft tissue (chest wall) < t2 <= dense
   core (heart, mediastinum, abdomen), computed twice, the second time
   without the air outside the body (dark runs reaching the left, right or
   top edge along their row or column), which can outweigh the lungs.
   Lung = air not outside. Edge levels: midway between the lung's median
   and the wall's median (thorax edge) or the core's median (heart edge),
   each located to sub-pixel precision by linear interpolation between the
   two pixels that straddle it.
3. Thorax width = the greatest lung extent (first to last lung pixel, at
   the thorax edge level) over rows. Rows with >= 80% of it are "mature"
   (below the narrow apices); a least-squares line through their extent
   midpoints is the midline, which follows the pose's tilt.
4. Cardiac silhouette border, per mature row and side: the innermost pixel
   below the heart edge level whose run of such pixels along the row
   reaches a lung pixel (so hilar vessel shadows count as lung, the stomach
   gas bubble under the dome does not), as a distance from the midline.
5. Each side's extreme is its greatest border distance above the
   cardiophrenic angle. Going down, the heart's border bulges out and turns
   in, its outward step per row falling; where the diaphragm dome takes
   over, the step jumps up again: a concave corner. Corners are rows where
   the outward step over k = max(1, round(S / 32)) rows grows by > 0.25 px
   per row, in the lower lung only (>= 68% of the way from the lung apex to
   the lung base: on 100 phantoms the heart's top lay above 67% and the
   angle below 72%); the angle is the lowest corner whose growth is >= 0.7
   x the sharpest one's (a wire or electrode on the dome makes weaker
   ones). No corner: every mature row counts. Heart width = left extreme +
   right extreme, both measured from the tilted midline (across the patient,
   as the phantoms' true CTR is), on whatever rows they lie.
6. ctr = heart width / thorax width.

Validated on 2026-11-28 on a 2-core CPU (shared with another job) against
the phantoms' known CTR (`agcg_jax.data.phantoms`; n / 2 seeds, each
rendered with both labels, so every pair is a counterfactual twin) by

  .venv/bin/python benchmarks/ruler_validation.py --sizes 32,64,128
  .venv/bin/python benchmarks/ruler_validation.py --sizes 32,64,128 \
      --split ruler_holdout
  .venv/bin/python benchmarks/ruler_validation.py --n 2000 --split ruler_big

  split (n)           size  MAE     max err  r       r in NF/CM   acc    twins
  ruler_check (400)   32    0.0180  0.363    0.957   0.81/0.67    0.995  1.000
                      64    0.0061  0.035    0.997   0.97/0.98    1.000  1.000
                      128   0.0040  0.025    0.999   0.99/0.99    1.000  1.000
  ruler_holdout (400) 32    0.0191  0.372    0.941   0.75/0.68    0.988  0.990
                      64    0.0058  0.035    0.997   0.97/0.98    1.000  1.000
                      128   0.0037  0.034    0.999   0.98/0.99    1.000  1.000
  ruler_big (2000)    64    0.0064  0.093    0.996   0.95/0.97    1.000  1.000

(acc: (ctr > 0.5) == label; twins: share of pairs with ruler(label 1) >
ruler(label 0); r in NF/CM: Pearson r within each label.) Baselines: always
the mean CTR, MAE 0.094; each label's mean CTR (a ruler that only knew the
class), MAE 0.026-0.030. The constants were tuned on ruler_check (and two
private splits), not on ruler_holdout or ruler_big. What limits it: the
lowest part of the heart lies under the dome, so where the dome meets the
heart high (a small heart's right border) the extreme is read at the
angle; a heart top that sits unusually low, or a dome corner too faint,
picks the wrong corner (0.3% of images off by > 0.05 at 64 px); at 32 px
the heart's and dome's corners blur into each other and faint lower lungs
fall above the threshold (2.5-4% off by > 0.05). The 68% rule is a prior
fitted to the phantoms' anatomy; other anatomy (real radiographs) would
need it checked.

Outputs are in pixels of the given image (widths) and unitless (ctr).
`valid` is False where the lungs or a side's border were not found; there
`heart_width` and `ctr` are NaN, so average with the mask or nanmean.
"""
import jax
import jax.numpy as jnp

from agcg_jax import metrics

_BINS = 64             # Histogram bins for the Otsu thresholds.
_MATURE = 0.8          # Mature rows: lung extent >= this x the widest.
_LOWER_LUNG = 0.68     # Cardiophrenic corners: this far from apex to base.
_CORNER_STEP = 0.25    # ... where the outward step grows by > this px/row;
_STRONG = 0.7          # the lowest of those >= this x the sharpest one.


def _row_blur(x):
  """1x3 (along rows) box blur of [B, S, S] with edge padding."""
  s = x.shape[-1]
  p = jnp.pad(x, ((0, 0), (0, 0), (1, 1)), mode="edge")
  return (p[:, :, 0:s] + p[:, :, 1:s + 1] + p[:, :, 2:s + 2]) * (1.0 / 3.0)


def _grey_open(x, r):
  """Grey opening of [B, S, S] (min then max filter, (2r+1)^2 square).

  Each square filter runs as a column then a row filter: the same values
  (min and max separate over a rectangle), 2(2r+1) instead of (2r+1)^2
  comparisons per pixel (40x faster at 256 px).
  """
  def square(v, init, op):
    for win in ((1, 2 * r + 1, 1), (1, 1, 2 * r + 1)):
      v = jax.lax.reduce_window(v, init, op, win, (1, 1, 1), "SAME")
    return v
  return square(square(x, jnp.inf, jax.lax.min), -jnp.inf, jax.lax.max)


def _otsu3(x, mask, bins=_BINS):
  """Thresholds t1 < t2, [B] each: 3-class Otsu of x [B, S, S] in [0, 1]
  over the pixels where mask."""
  b = x.shape[0]
  idx = jnp.clip((x * bins).astype(jnp.int32), 0, bins - 1).reshape(b, -1)
  wts = mask.astype(jnp.float32).reshape(b, -1)
  hist = jax.vmap(lambda i, w: jnp.zeros(bins, jnp.float32).at[i].add(w))(
      idx, wts)
  centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) / bins
  zero = jnp.zeros((b, 1), jnp.float32)
  w = jnp.concatenate([zero, jnp.cumsum(hist, -1)], -1)        # [B, bins+1]
  m = jnp.concatenate([zero, jnp.cumsum(hist * centres, -1)], -1)
  # Classes [0, i), [i, j), [j, bins): maximise sum over classes m^2 / w,
  # which is the between-class variance up to constants.
  w0, w1 = w[:, :, None], w[:, None, :] - w[:, :, None]
  w2 = w[:, -1:, None] - w[:, None, :]
  m0, m1 = m[:, :, None], m[:, None, :] - m[:, :, None]
  m2 = m[:, -1:, None] - m[:, None, :]
  score = (m0 * m0 / jnp.maximum(w0, 1e-6) + m1 * m1 / jnp.maximum(w1, 1e-6)
           + m2 * m2 / jnp.maximum(w2, 1e-6))
  ok = (w0 > 0) & (w1 > 0) & (w2 > 0)
  best = jnp.argmax(jnp.where(ok, score, -jnp.inf).reshape(b, -1), -1)
  return (best // (bins + 1)) / bins, (best % (bins + 1)) / bins


def _median_where(x, mask):
  """Median of [B, S, S] x over mask, [B, 1, 1] (0 where the mask is empty)."""
  b = x.shape[0]
  mask = mask.reshape(b, -1)
  count = mask.sum(-1)
  med = metrics.kth_smallest(x.reshape(b, -1), mask, jnp.maximum(count - 1, 0) // 2)
  return jnp.where(count > 0, med, 0.0)[:, None, None]


def _outside(air):
  """Air reachable along its row from the left or right edge, or along its
  column from the top edge: outside the body."""
  air_i = air.astype(jnp.int32)
  return ((jax.lax.cummin(air_i, axis=2) > 0)
          | (jax.lax.cummin(air_i, axis=2, reverse=True) > 0)
          | (jax.lax.cummin(air_i, axis=1) > 0))


def _run_touches(dark, mark):
  """dark pixels whose run of dark pixels along the row holds a mark pixel."""
  cols = jnp.arange(dark.shape[-1])
  n = dark.shape[-1]
  # Nearest break (non-dark) and nearest mark at or left / right of each pixel.
  brk_l = jax.lax.cummax(jnp.where(dark, -1, cols), axis=2)
  mrk_l = jax.lax.cummax(jnp.where(mark, cols, -1), axis=2)
  brk_r = jax.lax.cummin(jnp.where(dark, n, cols), axis=2, reverse=True)
  mrk_r = jax.lax.cummin(jnp.where(mark, cols, n), axis=2, reverse=True)
  return dark & ((mrk_l > brk_l) | (mrk_r < brk_r))


def silhouette_trace(images):
  """`silhouette_ctr` with its per-row workings, for figures and debugging.

  Args:
    images: float [B, S, S] or [B, S, S, 1] in [-1, 1] (bright = dense).

  Returns:
    `silhouette_ctr`'s dict plus, per image: `lung` bool [B, S, S]; per row
    [B, S]: `midline` (pixel-edge column), `border_left` / `border_right`
    (distance of the silhouette's border from the midline, NaN where not
    measured), `kept_left` / `kept_right` (rows above the cardiophrenic
    angle that the extremes come from), `thorax_extent`.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3 or x.shape[1] != x.shape[2]:
    raise ValueError(f"images must be [B, S, S] or [B, S, S, 1], got "
                     f"{jnp.shape(images)}")
  b, s, _ = x.shape
  x = (jnp.clip(x, -1.0, 1.0) + 1.0) * 0.5
  x = _grey_open(x, max(1, round(s / 48)))
  if s >= 48:
    x = _row_blur(x)

  # --- Classes and levels. ---
  t1, _ = _otsu3(x, jnp.ones(x.shape, bool))
  # Again without the air outside the body, which can outweigh the lungs.
  t1, t2 = _otsu3(x, ~_outside(x < t1[:, None, None]))
  t1, t2 = t1[:, None, None], t2[:, None, None]
  air = x < t1
  lung = air & ~_outside(air)
  lung_level = _median_where(x, lung)
  level_thorax = (lung_level + _median_where(x, (x >= t1) & (x < t2))) * 0.5
  level_heart = (lung_level + _median_where(x, x >= t2)) * 0.5  # [B, 1, 1]

  cols = jnp.arange(s)
  rows = jnp.arange(s, dtype=jnp.float32)
  big = s + 1

  def at(j):
    return jnp.take_along_axis(x, jnp.clip(j, 0, s - 1)[..., None], 2)[..., 0]

  def crossing(j, level):
    # Pixel-edge position where x crosses `level` between centres j, j + 1.
    v0, v1 = at(j), at(j + 1)
    dv = v1 - v0
    dv = jnp.where(jnp.abs(dv) < 1e-6, 1e-6, dv)
    return j + 0.5 + jnp.clip((level - v0) / dv, 0.0, 1.0)

  # --- Thorax: lung extent per row. ---
  has = lung.any(-1)                                          # [B, S]
  first = jnp.where(lung, cols, big).min(-1)
  last = jnp.where(lung, cols, -1).max(-1)
  left = crossing(first - 1, level_thorax[..., 0])
  right = crossing(last, level_thorax[..., 0])
  extent = jnp.where(has, right - left, 0.0)
  thorax_width = extent.max(-1)
  mature = has & (extent >= _MATURE * thorax_width[:, None])
  # Midline: least-squares line through the mature rows' extent midpoints.
  wgt = mature.astype(jnp.float32)
  n = jnp.maximum(wgt.sum(-1, keepdims=True), 1.0)
  mid = (left + right) * 0.5
  r_bar = (wgt * rows).sum(-1, keepdims=True) / n
  m_bar = (wgt * mid).sum(-1, keepdims=True) / n
  slope = ((wgt * (rows - r_bar) * (mid - m_bar)).sum(-1, keepdims=True)
           / jnp.maximum((wgt * (rows - r_bar) ** 2).sum(-1, keepdims=True),
                         1.0))
  midline = m_bar + slope * (rows - r_bar)                    # [B, S]

  # --- Cardiac silhouette borders. ---
  inside = ((cols >= first[..., None]) & (cols <= last[..., None]))
  clear = _run_touches((x < level_heart) & inside, lung)
  centre = cols + 0.5
  on_left = clear & (centre < midline[..., None])
  on_right = clear & (centre > midline[..., None])
  j_left = jnp.where(on_left, cols, -1).max(-1)               # innermost
  j_right = jnp.where(on_right, cols, big).min(-1)
  lh = level_heart[..., 0]
  border_left = jnp.where(mature & on_left.any(-1),
                          midline - crossing(j_left, lh), jnp.nan)
  border_right = jnp.where(mature & on_right.any(-1),
                           crossing(j_right - 1, lh) - midline, jnp.nan)

  # --- Extremes above the cardiophrenic angle. ---
  top = jnp.where(has, rows, big).min(-1, keepdims=True)
  base = jnp.where(has, rows, -1.0).max(-1, keepdims=True)
  lower = (rows - top) >= _LOWER_LUNG * (base - top)
  k = max(1, round(s / 32))
  pad = jnp.full((b, k), jnp.nan)

  def extreme(border):
    below = jnp.concatenate([border[:, k:], pad], 1)
    above = jnp.concatenate([pad, border[:, :-k]], 1)
    growth = ((below - border) - (border - above)) / k
    corner = (growth > _CORNER_STEP) & lower
    growth = jnp.where(corner, growth, -jnp.inf)
    strong = corner & (growth >= _STRONG * growth.max(-1, keepdims=True))
    angle = jnp.where(strong, rows, -1.0).max(-1, keepdims=True)
    angle = jnp.where(angle < 0, float(big), angle)
    kept = (rows < angle) & ~jnp.isnan(border)
    return jnp.where(kept, border, -jnp.inf).max(-1), kept

  ext_left, kept_left = extreme(border_left)
  ext_right, kept_right = extreme(border_right)
  heart_width = ext_left + ext_right
  valid = jnp.isfinite(heart_width) & (thorax_width > 0)
  heart_width = jnp.where(valid, heart_width, jnp.nan)
  ctr = jnp.where(valid, heart_width / jnp.where(valid, thorax_width, 1.0),
                  jnp.nan)
  return {
      "heart_width": heart_width, "thorax_width": thorax_width, "ctr": ctr,
      "valid": valid, "lung": lung, "midline": midline,
      "border_left": border_left, "border_right": border_right,
      "kept_left": kept_left, "kept_right": kept_right,
      "thorax_extent": extent,
  }


def silhouette_ctr(images):
  """Cardiothoracic ratio of each image, read off its silhouettes.

  Args:
    images: float [B, S, S] or [B, S, S, 1] in [-1, 1] (bright = dense), as
      the pipeline feeds them (`agcg_jax.data.records.to_float`). Pure jnp:
      jit it, or call it inside a jitted function.

  Returns:
    A dict of [B] arrays: `heart_width` (pixels, the cardiac silhouette's
    greatest width across the patient), `thorax_width` (pixels, the lungs'
    greatest width), `ctr` (heart_width / thorax_width), `valid` (bool);
    `heart_width` and `ctr` are NaN where not `valid`.
  """
  out = silhouette_trace(images)
  return {key: out[key] for key in ("heart_width", "thorax_width", "ctr",
                                    "valid")}
