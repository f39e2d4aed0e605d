"""Scores of an explanation against ground truth: small pure functions, one job each.

Per-image functions are jnp, batched over the leading axis, and run inside
the jitted evaluation (evaluate.py); they return [B] arrays. Pooling over the
test set is done on sums (`pooled_ratio`), so evaluation keeps a few scalars
per batch, not maps.

One transform for every map that is scored by its mass: `positive` (the
positive part; identity for attention and |difference|, the evidence *for*
the decision for a signed CAM). No per-image rescaling: mass shares are
scale-free already, and a shift (min-max) would flatten a map towards chance.

Conventions: maps and masks [B, S, S]; images in [-1, 1], so one grey level
(of 255) is `GREY` = 2/255; boxes (x0, y0, x1, y1) in pixel edges (pixel j
spans [j, j+1), so a box covering columns 3..7 has x0 = 3, x1 = 8).
"""
import jax
import jax.numpy as jnp
import numpy as np

GREY = 2.0 / 255.0


def positive(maps: jnp.ndarray) -> jnp.ndarray:
  """The transform applied to every map before mass scores: max(map, 0)."""
  return jnp.maximum(maps, 0.0)


def _sum(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(x.astype(jnp.float32), axis=(1, 2))


def region_mass(maps: jnp.ndarray, region: jnp.ndarray) -> jnp.ndarray:
  """[B]: sum of `maps` over `region` (bool or {0, 1} [B, S, S])."""
  return _sum(maps * region.astype(maps.dtype))


def total_mass(maps: jnp.ndarray) -> jnp.ndarray:
  """[B]: sum of `maps` over the whole image."""
  return _sum(maps)


def area(region: jnp.ndarray) -> jnp.ndarray:
  """[B]: number of pixels in `region`."""
  return _sum(region.astype(jnp.float32))


def pooled_ratio(num, den) -> float:
  """sum(num) / sum(den) as a Python float; NaN when the denominator is 0."""
  num, den = float(np.sum(num)), float(np.sum(den))
  return num / den if den > 0 else float("nan")


def enrichment(mass_in, mass_all, area_in, area_ref) -> float:
  """(mass_in / mass_all) / (area_in / area_ref), from (pooled) sums.

  The share of a map's mass on a region divided by the region's share of a
  reference area: 1 for a map uniform over the reference (chance), above 1
  for a map concentrated on the region. Mass outside the reference still
  counts in `mass_all`, so a map that sits on the background scores below 1.
  """
  share = pooled_ratio(mass_in, mass_all)
  chance = pooled_ratio(area_in, area_ref)
  return share / chance if chance > 0 else float("nan")


def pearson(a: jnp.ndarray, b: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """[B]: Pearson correlation over the pixels of `mask` (all pixels if None); 0 if either map is constant there."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  w = jnp.ones_like(a) if mask is None else mask.astype(jnp.float32)
  n = jnp.maximum(_sum(w), 1.0)[:, None, None]
  ma = _sum(a * w)[:, None, None] / n
  mb = _sum(b * w)[:, None, None] / n
  da, db = (a - ma) * w, (b - mb) * w
  cov = _sum(da * db)
  den = jnp.sqrt(_sum(da * da) * _sum(db * db))
  return jnp.where(den > 0, cov / jnp.where(den > 0, den, 1.0), 0.0)


def _order_keys(x: jnp.ndarray) -> jnp.ndarray:
  """uint32 keys in the order of float32 `x` (-0.0 taken as 0.0; NaN above +inf)."""
  i = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # negative floats: reverse their bits' order
  return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _from_order_keys(u: jnp.ndarray) -> jnp.ndarray:
  i = jax.lax.bitcast_convert_type(u ^ jnp.uint32(0x80000000), jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i), jnp.float32)


def kth_smallest(values: jnp.ndarray, mask: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """[B]: the k-th (0-based) smallest of values [B, N] where mask [B, N], k [B] int.

  Exactly `jnp.sort(where(mask, values, inf))[k]` for 0 <= k < count, without
  the sort: a bisection on the values' order-preserving 32-bit keys, 32
  counting passes over [B, N] (a 65,536-pixel sort per image was half of
  evaluation's time at 256 px). Past the count it returns the largest key
  (NaN bits), so callers guard k.
  """
  keys = _order_keys(values)
  mask = mask.astype(bool)
  k = jnp.asarray(k, jnp.int32)
  lo = jnp.zeros(values.shape[:1], jnp.uint32)
  hi = jnp.full(values.shape[:1], 0xFFFFFFFF, jnp.uint32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum((keys <= mid[:, None]) & mask, axis=1, dtype=jnp.int32) > k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return _from_order_keys(lo)


def topk_iou(maps: jnp.ndarray, support: jnp.ndarray, within: jnp.ndarray | None = None) -> jnp.ndarray:
  """[B]: IoU of the map's k highest pixels (inside `within`) with `support`, k = |support|.

  Ties at the k-th value are broken by pixel order (the first ones are
  taken), so exactly k pixels are taken. 0 where the support is empty.
  """
  b = maps.shape[0]
  flat = maps.reshape(b, -1).astype(jnp.float32)
  supp = support.reshape(b, -1).astype(bool)
  if within is not None:
    flat = jnp.where(within.reshape(b, -1).astype(bool), flat, -jnp.inf)
  n = flat.shape[1]
  k = jnp.sum(supp, axis=1, dtype=jnp.int32)
  # The k-th highest value, then every pixel above it and the first ties at it.
  kth = kth_smallest(flat, jnp.ones_like(supp), jnp.clip(n - k, 0, n - 1))[:, None]
  above, tie = flat > kth, flat == kth
  ties_wanted = k - jnp.sum(above, axis=1, dtype=jnp.int32)
  top = above | (tie & (jnp.cumsum(tie, axis=1, dtype=jnp.int32) <= ties_wanted[:, None]))
  top &= (k > 0)[:, None]
  inter = jnp.sum(top & supp, axis=1)
  union = jnp.sum(top | supp, axis=1)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def topk_iou_chance(support_share: float) -> float:
  """Expected top-k IoU of a random map (k = support size, p = support share of the candidates).

  A random k-subset hits p*k support pixels on average: IoU = p / (2 - p).
  """
  p = float(support_share)
  return p / (2.0 - p)


def truth_support(real: jnp.ndarray, twin: jnp.ndarray, body: jnp.ndarray,
                  threshold_grey: float = 8.0) -> jnp.ndarray:
  """bool [B, S, S]: body pixels where the counterfactual twin differs from the image by > threshold grey levels."""
  return (jnp.abs(twin - real) > threshold_grey * GREY) & body.astype(bool)


def mean_abs(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """[B]: mean |a - b| over the image."""
  return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2))


def counterfactual_error(fake, real, twin) -> float:
  """sum MAE(fake, twin) / sum MAE(real, twin) over a set: 0 = the twin exactly, 1 = as far as doing nothing."""
  return pooled_ratio(mean_abs(fake, twin), mean_abs(real, twin))


def box_mask(boxes: jnp.ndarray, size: int) -> jnp.ndarray:
  """bool [B, S, S]: pixels whose centre lies in the box; boxes [B, 4] (x0, y0, x1, y1), pixel edges."""
  c = jnp.arange(size, dtype=jnp.float32) + 0.5
  x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
  cols = (c[None] >= x0) & (c[None] < x1)
  rows = (c[None] >= y0) & (c[None] < y1)
  return rows[:, :, None] & cols[:, None, :]


def argmax_point(maps: jnp.ndarray) -> jnp.ndarray:
  """[B, 2] float: (x, y) pixel centre of each map's maximum (first in row-major order on ties)."""
  b, _, w = maps.shape
  i = jnp.argmax(maps.reshape(b, -1), axis=1)
  return jnp.stack([(i % w).astype(jnp.float32) + 0.5, (i // w).astype(jnp.float32) + 0.5], axis=1)


def point_in_box(points: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
  """bool [B]: (x, y) points [B, 2] (or one [2] for all) inside boxes [B, 4], pixel edges."""
  points = jnp.broadcast_to(points, (boxes.shape[0], 2))
  x, y = points[:, 0], points[:, 1]
  return (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])


def pointing(maps: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
  """bool [B]: the pointing game, whether each map's maximum lies in its box."""
  return point_in_box(argmax_point(maps), boxes)


def box_centre(boxes: np.ndarray) -> np.ndarray:
  """(x, y) centres of boxes [N, 4] -> [N, 2]."""
  boxes = np.asarray(boxes, np.float64)
  return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def direction_correct(before: jnp.ndarray, after: jnp.ndarray, want_up: jnp.ndarray) -> jnp.ndarray:
  """bool [B]: `after` moved the wanted way from `before` (strictly: no change is wrong)."""
  return jnp.where(want_up, after > before, after < before)


def _box_pixels(box, size: int) -> tuple[int, int, int, int]:
  """(r0, r1, c0, c1) slices of the pixels whose centres lie in `box` (as `box_mask`)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  first = lambda e: int(np.clip(np.ceil(e - 0.5), 0, size))
  return first(y0), first(y1), first(x0), first(x1)


def box_baselines(test_boxes, train_boxes, size: int) -> dict:
  """The trivial baselines of the box scores, on the host from boxes only.

  prior: the mean Cardiomegaly box mask of the training boxes (a map that
  only knows where hearts usually are), scored like every map (mass share in
  each test box over the box's area share). fixed point: the mean training
  box centre, as a pointer that never looks at the image. Without training
  boxes (NIH's official split puts them all in the test set), each test box
  is scored against the mean of the *other* test boxes (leave-one-out).

  Args:
    test_boxes: [N, 4] (x0, y0, x1, y1) pixel edges, N >= 1.
    train_boxes: [M, 4], M >= 0.
    size: image side S.

  Returns:
    {"prior_box_enrichment", "gaussian_prior_box_enrichment" (a Gaussian at
    the mean box centre, sigmas the mean half sizes), "fixed_point_pointing",
    "box_baseline_source"}.
  """
  test = np.asarray(test_boxes, np.float64).reshape(-1, 4)
  train = np.asarray(train_boxes, np.float64).reshape(-1, 4)
  n = len(test)
  loo = len(train) == 0
  if n == 0 or (loo and n < 2):
    return {"prior_box_enrichment": None, "gaussian_prior_box_enrichment": None,
            "fixed_point_pointing": None, "box_baseline_source": None}
  ref = test if loo else train

  def masks_sum(boxes):
    total = np.zeros((size, size))
    for b in boxes:
      r0, r1, c0, c1 = _box_pixels(b, size)
      total[r0:r1, c0:c1] += 1.0
    return total
  total = masks_sum(ref)
  integral = np.pad(total.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  centre_sum = box_centre(ref).sum(0)
  mass_in, mass_all, areas, hits = 0.0, 0.0, 0.0, 0
  for b in test:
    r0, r1, c0, c1 = _box_pixels(b, size)
    area_i = max(r1 - r0, 0) * max(c1 - c0, 0)
    in_total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    if loo:  # the other test boxes only: remove this box's own mask and centre
      mass_in += (in_total - area_i) / (n - 1)
      mass_all += (total.sum() - area_i) / (n - 1)
      point = (centre_sum - box_centre(b[None])[0]) / (n - 1)
    else:
      mass_in += in_total / len(ref)
      mass_all += total.sum() / len(ref)
      point = centre_sum / len(ref)
    areas += area_i / (size * size)
    hits += int(b[0] <= point[0] < b[2] and b[1] <= point[1] < b[3])
  share = mass_in / mass_all if mass_all > 0 else float("nan")
  # A Gaussian at the mean box centre with the mean box's half sizes as sigmas: a smooth map
  # of where heart boxes usually are (leave-one-out as above).
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  g_in, g_all = 0.0, 0.0
  for i, b in enumerate(test):
    others = np.delete(test, i, 0) if loo else ref
    cx, cy = box_centre(others).mean(0)
    sx = max(float(np.mean(others[:, 2] - others[:, 0])) / 2, 1.0)
    sy = max(float(np.mean(others[:, 3] - others[:, 1])) / 2, 1.0)
    gauss = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    r0, r1, c0, c1 = _box_pixels(b, size)
    g_in += gauss[r0:r1, c0:c1].sum() / gauss.sum()
    g_all += 1.0
  g_share = g_in / g_all
  return {"prior_box_enrichment": share / (areas / n) if areas > 0 else float("nan"),
          "gaussian_prior_box_enrichment": g_share / (areas / n) if areas > 0 else float("nan"),
          "fixed_point_pointing": hits / n,
          "box_baseline_source": "other test boxes (leave-one-out)" if loo else "training boxes"}


# ---------------------------------------------------------------- box swap
# A map that only knows where hearts usually are scores well on mass-in-box
# (every heart box sits in the same place); it cannot tell *this* image's box
# from another image's. The box-swap margin asks exactly that.

SWAP_GRID = 64  # maps are pooled to at most this grid before the host keeps them


def pool_map(maps: np.ndarray, grid: int = SWAP_GRID) -> np.ndarray:
  """[N, S, S] -> [N, g, g] by block means, g = S / (the smallest factor making g <= grid)."""
  maps = np.asarray(maps, np.float32)
  n, s, _ = maps.shape
  k = 1
  while s // k > grid and s % (2 * k) == 0:
    k *= 2
  return maps.reshape(n, s // k, k, s // k, k).mean((2, 4)) if k > 1 else maps


def box_coverage(boxes: np.ndarray, size: int, grid: int) -> np.ndarray:
  """[N, g, g]: the share of each grid cell (of S / g pixels a side) inside each box (x0, y0, x1, y1)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  edges = np.arange(grid + 1) * (size / grid)
  lo, hi = edges[:-1], edges[1:]

  def overlap(a, b):  # [N, g]: the share of each cell's extent inside [a, b]
    return np.clip(np.minimum(hi, b[:, None]) - np.maximum(lo, a[:, None]), 0, None) / (hi - lo)
  return overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]


def box_swap_margins(maps: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """[N]: each map's mass share in its own box minus its mean share in the other N - 1 boxes.

  Args:
    maps: [N, g, g] non-negative maps (the positive part, pooled to a grid g).
    boxes: [N, 4] their images' boxes, (x0, y0, x1, y1) in pixels of the S-pixel image.
    size: S.

  A map uniform over the image, or any map that ignores the image (a fixed
  prior), has a mean margin of 0 (exactly, for the same map everywhere); a map
  on its own box and nowhere else scores 1 minus the mean overlap of boxes.
  """
  maps = np.asarray(maps, np.float64)
  n = len(maps)
  if n < 2:
    return np.full(n, np.nan)
  p = maps / np.maximum(maps.sum((1, 2), keepdims=True), 1e-12)
  cover = box_coverage(boxes, size, maps.shape[-1])
  own = (p * cover).sum((1, 2))
  all_boxes = cover.sum(0)
  others = ((p * all_boxes[None]).sum((1, 2)) - own) / (n - 1)
  return own - others


def bootstrap_ci(values: np.ndarray, *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> list[float]:
  """[low, high]: the percentile bootstrap interval of the mean of `values` (NaNs dropped)."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if len(v) < 2:
    return [float("nan"), float("nan")]
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
  a = (1 - level) / 2
  return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


# ------------------------------------------------------- drawn heart outlines


def lateral_border_band(heart: jnp.ndarray, width: int) -> jnp.ndarray:
  """bool [B, S, S]: pixels within `width` columns of each row's leftmost or rightmost heart pixel.

  The lateral borders are what the cardiothoracic ratio measures (the
  heart's horizontal extent); rows without heart have no band.
  """
  heart = heart.astype(bool)
  w = heart.shape[-1]
  cols = jnp.arange(w)
  any_row = heart.any(-1)                                     # [B, H]
  left = jnp.argmax(heart, -1)                                # first heart column per row
  right = w - 1 - jnp.argmax(heart[..., ::-1], -1)            # last heart column per row
  near = lambda edge: jnp.abs(cols[None, None, :] - edge[..., None]) <= width
  return any_row[..., None] & (near(left) | near(right))


def thorax_mask(heart: jnp.ndarray, lungs: jnp.ndarray) -> jnp.ndarray:
  """bool [B, S, S]: per row, the pixels between the outermost lung-or-heart pixels (the thorax)."""
  inside = heart.astype(bool) | lungs.astype(bool)
  from_left = jnp.cumsum(inside, axis=-1) > 0
  from_right = jnp.cumsum(inside[..., ::-1], axis=-1)[..., ::-1] > 0
  return from_left & from_right


def border_width(size: int) -> int:
  """The band's half width in pixels: 2 at 64 px, scaled with the image."""
  return max(1, round(2 * size / 64))


def pooled_pearson(sx, sy, sxx, syy, sxy, n) -> float:
  """Pearson r from pooled sums of x, y, x², y², xy over n pairs (NaN if undefined)."""
  if n < 2:
    return float("nan")
  cov = sxy / n - (sx / n) * (sy / n)
  vx, vy = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
  return float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else float("nan")
