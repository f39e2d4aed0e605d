"""Synthetic frontal chest radiographs whose heart size is known.

A phantom is drawn in "canonical" body coordinates (x to the image's right,
y down, both in [-1, 1] over the image before the global pose), then seen
through a random pose (shift, rotation, scale), rendered at 2x the stored
size or more (at least 128 pixels across) and area-averaged down, so edges
are antialiased at every stored size from 32 to 256.

Anatomy (bright = dense, as on film): soft-tissue body, two dark lung fields
inside the thoracic cavity, mediastinum with trachea and aortic knob, spine,
posterior ribs, clavicles, humeral heads, diaphragm domes over a bright
abdomen, and the heart: a tilted ellipse in the lower mediastinum that
extends more to the image's right (the patient's left) and covers the medial
lungs. Only the heart depends on the label: its width is set by the
cardiothoracic ratio (CTR), its height follows with its (label-independent)
shape, and a big heart sits a little higher. No Finding draws CTR in
[0.36, 0.46],
Cardiomegaly in [0.54, 0.66], so the measured CTR is always on the right side
of the clinical 0.5 threshold.

Nuisances (exposure, gamma, contrast, brightness offset, pose, noise, blur,
ECG wires, pacemaker, stomach gas) come from the same random stream whatever the label:
the label's only draw is mapped into the label's CTR range. So
`make_phantom(seed, size, 0)` and `make_phantom(seed, size, 1)` are a
counterfactual pair that differ only in the heart (and what it covers).

Ground truth comes from the rendered masks, in pixels of the stored image:
boxes are (x0, y0, x1, y1) with pixel edges as coordinates (a mask covering
columns 3..7 has x0 = 3, x1 = 8), measured on the supersampled masks, and
`ctr` = the heart's greatest width / the inner thorax's greatest width
(inside the ribs), both measured across the patient on the rendered masks;
without rotation that is heart box width / thorax box width.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

# The CTR ranges per label (index = label); a gap around 0.5 keeps every
# measured CTR on its label's side despite pose and pixel rounding.
CTR_RANGES = ((0.36, 0.46), (0.54, 0.66))
CTR_THRESHOLD = 0.5
MIN_SIZE = 16
# Render at least this many pixels across before area downsampling: 2x for
# sizes >= 64, more for smaller ones so thin structures still average well.
_MIN_RENDER = 128
_DEVICE_INTENSITY = 0.95


def phantom_seed(base_seed: int, split: str, index: int) -> int:
  """The seed of example `index` of `split`: a pure function of all three.

  Args:
    base_seed: the dataset's seed (>= 0).
    split: split name, e.g. "train" or "test".
    index: example index within the split (>= 0).

  Returns:
    An int in [0, 2**63), different for different (base_seed, split, index).
  """
  # crc32 is stable across processes and Python versions (str hash is not).
  entropy = [int(base_seed), zlib.crc32(split.encode("utf-8")), int(index)]
  words = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
  return int((int(words[0]) << 31) ^ int(words[1]))


def _supersample(size: int) -> int:
  """Integer render factor for a stored size (exact area downsampling)."""
  return max(2, -(-_MIN_RENDER // size))


def _smooth_inside(signed_dist: np.ndarray, width: float) -> np.ndarray:
  """Soft indicator of `signed_dist < 0` (negative inside): 1 inside, 0 outside.

  A linear ramp `width` wide (in normalised units) centred on the boundary,
  so edges look like tissue rather than cut-outs.
  """
  return np.clip(0.5 - signed_dist / width, 0.0, 1.0)


def _ellipse_sdist(x, y, cx, cy, a, b, angle=0.0):
  """Approximate signed distance to an ellipse (negative inside).

  `angle` rotates the `a` axis from +x towards +y (down) in radians.
  """
  c, s = math.cos(angle), math.sin(angle)
  dx, dy = x - cx, y - cy
  u = c * dx + s * dy
  v = -s * dx + c * dy
  r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  return (r - 1.0) * min(a, b)


def _bezier(points: np.ndarray, num: int = 16) -> np.ndarray:
  """Points [num, 2] along the Bezier curve with control points [K, 2]."""
  t = np.linspace(0.0, 1.0, num)[:, None, None]
  pts = np.broadcast_to(points.astype(np.float64), (num,) + points.shape)
  while pts.shape[1] > 1:  # de Casteljau, vectorised over t.
    pts = (1 - t) * pts[:, :-1] + t * pts[:, 1:]
  return pts[:, 0]


def _polyline_dist(x, y, pts: np.ndarray) -> np.ndarray:
  """Distance from grid points (x, y) to the polyline through pts [K, 2]."""
  best = np.full(x.shape, np.inf, x.dtype)
  for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
    dx, dy = x1 - x0, y1 - y0
    denom = dx * dx + dy * dy + 1e-12
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / denom, 0.0, 1.0)
    d2 = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
    np.minimum(best, d2, out=best)
  return np.sqrt(best)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of a 2-D image with edge padding."""
  if sigma < 0.2:
    return img
  radius = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  h, w = img.shape
  p = np.pad(img, radius, mode="edge")
  rows = sum(k[i] * p[:, i:i + w] for i in range(2 * radius + 1))
  return sum(k[i] * rows[i:i + h] for i in range(2 * radius + 1))


def _area_down(img: np.ndarray, f: int) -> np.ndarray:
  """Area-average an [f*S, f*S] image to [S, S] (exact box filter)."""
  s = img.shape[0] // f
  return img.reshape(s, f, s, f).mean(axis=(1, 3))


def _box(mask: np.ndarray, f: int) -> np.ndarray:
  """(x0, y0, x1, y1) of a boolean [f*S, f*S] mask, in stored-pixel edges."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return np.zeros(4, np.float32)
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1],
                  np.float32) / f


def _extent(coord: np.ndarray, mask: np.ndarray) -> float:
  """Extent of `mask` along `coord` (one value per render pixel), edges in."""
  values = coord[mask]
  # Pixel centres span one pixel less than the pixels themselves.
  return float(values.max() - values.min()) + float(
      np.abs(coord[0, 1] - coord[0, 0]) + np.abs(coord[1, 0] - coord[0, 0]))


class _Pose:
  """The global pose: canonical body coordinates <-> image coordinates.

  Image coordinates are normalised to [-1, 1] over the image (x right, y
  down); canonical = R(-rot) (image - shift) / scale.
  """

  def __init__(self, shift, rot, scale, res):
    self.sx, self.sy = shift
    self.c, self.s = math.cos(rot), math.sin(rot)
    self.scale = scale
    self.res = res
    self.px = 2.0 / res

  def grid(self, res=None):
    """Canonical (x, y), float32 [n, n], of the pixel centres of an n-grid."""
    n = res or self.res
    g = ((np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0)
    xs = (g[None, :] - self.sx) / self.scale
    ys = (g[:, None] - self.sy) / self.scale
    return self.c * xs + self.s * ys, -self.s * xs + self.c * ys

  def window(self, x0, y0, x1, y1):
    """Render-pixel slices covering the canonical box, or None if off-image.

    Small shapes are evaluated only there: it makes devices and bones nearly
    free instead of costing a full-image pass each.
    """
    # Plain floats: this runs per stroke segment, where numpy's per-call
    # overhead on 4-element arrays would dominate.
    c, s, k = self.c, self.s, self.scale
    cols, rows = [], []
    for cx, cy in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
      cols.append((k * (c * cx - s * cy) + self.sx + 1.0) / self.px - 0.5)
      rows.append((k * (s * cx + c * cy) + self.sy + 1.0) / self.px - 0.5)
    c0 = max(0, math.floor(min(cols)) - 1)
    c1 = min(self.res, math.ceil(max(cols)) + 2)
    r0 = max(0, math.floor(min(rows)) - 1)
    r1 = min(self.res, math.ceil(max(rows)) + 2)
    if c0 >= c1 or r0 >= r1:
      return None
    return slice(r0, r1), slice(c0, c1)


def _paint_max(canvas, pose, x, y, box, fn):
  """canvas = max(canvas, fn(x, y)) inside the canonical `box` only."""
  win = pose.window(*box)
  if win is not None:
    np.maximum(canvas[win], fn(x[win], y[win]), out=canvas[win])


def make_phantom(seed: int, size: int = 64, label: int = 0) -> dict:
  """One synthetic frontal chest radiograph with ground truth.

  Args:
    seed: any int >= 0; the phantom is a pure function of (seed, size, label).
      The same seed with the other label gives the same patient, pose,
      exposure and devices with only the heart size changed.
    size: stored image side S in pixels (>= 16; 32..256 intended).
    label: 0 = No Finding (CTR < 0.5), 1 = Cardiomegaly (CTR > 0.5).

  Returns:
    A dict of numpy values:
      image: uint8 [S, S, 1], 0 = black (air), 255 = white (dense).
      heart_mask: uint8 [S, S, 1] in {0, 1}: the heart covers >= half the
        pixel.
      body_mask: uint8 [S, S, 1] in {0, 1}: the body (anything but the air
        around the patient) covers >= half the pixel; the same for both
        labels of a seed.
      ctr: float32 scalar, heart width / inner thorax width, measured across
        the patient on the rendered masks (~ the ratio of the box widths;
        the same up to pose rotation).
      heart_box: float32 [4], (x0, y0, x1, y1) in stored pixels, edges.
      thorax_box: float32 [4], the inner thoracic cavity, same convention.
      label: int, the given label.
  """
  if label not in (0, 1):
    raise ValueError(f"label must be 0 or 1, got {label!r}")
  if size < MIN_SIZE:
    raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
  rng = np.random.default_rng(seed)

  def draw(lo, hi, n=None):
    # Python floats: numpy float64 scalars would upcast the float32 grids.
    return float(rng.uniform(lo, hi)) if n is None else [
        float(v) for v in rng.uniform(lo, hi, n)]

  # --- Draws. Every draw happens whatever the label, in a fixed order, so
  # the label changes nothing but where its one draw maps the CTR. ---
  lo, hi = CTR_RANGES[label]
  ctr_design = draw(lo, hi)
  # Patient.
  thorax_hw = draw(0.70, 0.80)       # Inner thoracic half-width.
  thorax_top = draw(-0.78, -0.70)    # Lung apices.
  thorax_bottom = draw(0.64, 0.72)   # Costophrenic angles.
  wall = draw(0.10, 0.15)            # Chest wall + arm thickness.
  mediast_hw = draw(0.10, 0.13)
  dome_img_left = draw(0.30, 0.38)   # Patient's right dome: higher (liver).
  dome_img_right = dome_img_left + draw(0.02, 0.08)
  heart_aspect = draw(0.62, 0.74)    # Minor / major semi-axis.
  heart_tilt = math.radians(draw(20.0, 34.0))
  heart_shift = draw(0.12, 0.18)     # Centre right of midline, / width.
  rib_spacing = draw(0.125, 0.145)
  rib_phase = draw(-0.02, 0.02)
  rib_bend = draw(0.30, 0.42)
  mottle = rng.standard_normal((2, 7, 7)).astype(np.float32)
  vessel_gain = draw(0.15, 0.3)
  vessel_phase = draw(0.0, 2 * np.pi, 2)
  # Pose.
  shift = draw(-0.08, 0.08, 2)       # +-4% of the image side.
  rot = math.radians(draw(-5.0, 5.0))
  scale = draw(0.92, 1.08)
  # Exposure and sensor.
  gamma = math.exp(draw(math.log(0.75), math.log(1.35)))
  contrast = draw(0.85, 1.15)
  offset = draw(-0.07, 0.07)
  blur_sigma = draw(0.0, 0.8)        # Stored pixels.
  noise_sigma = draw(0.004, 0.025)
  noise_seed = int(rng.integers(2**31))
  # Devices.
  num_wires = int(rng.choice(4, p=[0.55, 0.1, 0.2, 0.15]))
  wire_ctrl = rng.uniform(size=(3, 4, 2))
  has_pacer = bool(rng.uniform() < 0.15)
  pacer_side = 1.0 if rng.uniform() < 0.8 else -1.0  # Usually patient's left.
  pacer_xy = draw(0.0, 1.0, 2)
  lead_end = draw(0.0, 1.0, 2)
  lead_wiggle = draw(-1.0, 1.0, 3)
  # Gas in the stomach under the patient's left dome, often but not always.
  has_bubble = bool(rng.uniform() < 0.6)
  bubble = draw(0.0, 1.0, 3)

  f = _supersample(size)
  res = f * size
  pose = _Pose(shift, rot, scale, res)
  px = pose.px  # One render pixel in normalised units.
  edge = 2.5 * px + 0.012  # Soft edge width of anatomy.
  x, y = pose.grid()
  ax = np.abs(x)

  # --- Thoracic cavity: rounded apices, near-vertical lower walls. ---
  cav_mid = thorax_top + 0.55 * (thorax_bottom - thorax_top)
  up = np.clip((cav_mid - y) * (1.0 / (cav_mid - thorax_top)), 0.0, 1.0)
  # The walls lean out slightly towards the bases.
  lean = 0.96 + 0.04 * np.clip((y - thorax_top) * (
      1.0 / (thorax_bottom - thorax_top)), 0, 1)
  cav_hw = thorax_hw * np.sqrt(1.0 - up * up) * lean
  cav_sd = np.maximum(ax - cav_hw, y - thorax_bottom)
  cavity_hard = cav_sd < 0
  cavity = _smooth_inside(cav_sd, edge)

  # --- Body: trunk, neck and shoulders. ---
  shoulder = np.sqrt(np.clip((y + 1.05) * (1 / 0.35), 0, 1))  # 0 at the top.
  body_hw = 0.24 + (thorax_hw + wall + 0.12 - 0.24
                    + 0.06 * np.clip(y, 0, None)) * shoulder
  body = _smooth_inside(ax - body_hw, 3 * edge)

  # --- Diaphragm domes over the abdomen. ---
  apex = np.where(x > 0, np.float32(dome_img_right), np.float32(dome_img_left))
  du = ax - 0.36 * thorax_hw / 0.75
  dome_y = apex + np.where(du > 0, np.float32(2.0), np.float32(0.7)) * du * du
  above_dome = _smooth_inside(y - dome_y, edge)
  abdomen = _smooth_inside(np.maximum(ax - thorax_hw - 0.02, dome_y - y), edge)
  # Dense core: cavity contents plus the abdomen under the domes.
  core = np.maximum(cavity, abdomen)

  # --- Heart: a tilted ellipse whose width is CTR x thorax width. ---
  heart_w = ctr_design * 2.0 * thorax_hw
  ct2, st2 = math.cos(heart_tilt) ** 2, math.sin(heart_tilt) ** 2
  heart_a = heart_w / 2 / math.sqrt(ct2 + heart_aspect ** 2 * st2)
  heart_b = heart_aspect * heart_a
  heart_hh = heart_a * math.sqrt(st2 + heart_aspect ** 2 * ct2)
  heart_cx = heart_shift * heart_w
  # The heart rests on the diaphragm, its lowest part hidden under the dome;
  # a big one rises so it stays inside the thoracic cavity (and its box).
  heart_cy = min(dome_img_right - 0.32 * heart_hh,
                 thorax_bottom - 0.03 - heart_hh)
  heart_sd = _ellipse_sdist(x, y, heart_cx, heart_cy, heart_a, heart_b,
                            heart_tilt)
  heart_hard = heart_sd < 0
  heart = _smooth_inside(heart_sd, edge)

  # --- Mediastinum and aortic knob. ---
  mediast = _smooth_inside(np.maximum(np.abs(x - 0.01) - mediast_hw,
                                      thorax_top - 0.1 - y), edge)
  kx, ky, ka, kb = mediast_hw + 0.01, -0.36, 0.09, 0.075
  _paint_max(mediast, pose, x, y, (kx - ka - edge, ky - kb - edge,
                                   kx + ka + edge, ky + kb + edge),
             lambda x, y: _smooth_inside(
                 _ellipse_sdist(x, y, kx, ky, ka, kb), edge))

  # --- Lungs: air where the cavity is not mediastinum, heart or abdomen. ---
  lung = cavity * above_dome * (1 - mediast) * (1 - heart)
  # Lung markings are smooth or finer than a stored pixel anyway, so they are
  # computed on the stored grid and repeated: 4-16x fewer transcendentals.
  xl, yl = pose.grid(size)
  markings = _lung_markings(xl, yl, thorax_hw, mottle, vessel_gain,
                            vessel_phase)
  markings = np.repeat(np.repeat(markings, f, axis=0), f, axis=1)
  air = lung * markings

  # --- Bones. ---
  # Posterior ribs: parallel curved bands, rising a little then bending down
  # laterally; the band index is periodic in the bent coordinate, so all
  # ribs together cost one pass.
  bent = y - (-0.10 * ax + rib_bend * ax * ax) - thorax_top - rib_phase
  rib_i = np.round(bent * (1.0 / rib_spacing))
  slope = -0.10 + 2 * rib_bend * ax
  rib_d = np.abs(bent - rib_i * rib_spacing) / np.sqrt(1.0 + slope * slope)
  rib_core = _smooth_inside(rib_d - 0.02, 1.5 * edge)
  rib_cortex = _smooth_inside(np.abs(rib_d - 0.02) - 0.005, edge)
  rib_keep = ((rib_i >= 0) & (rib_i <= 10)).astype(np.float32)
  rib_keep *= _smooth_inside(ax - (cav_hw + 0.05), 2 * edge)
  rib_keep *= 1.0 - _smooth_inside(ax - 0.07, 2 * edge)
  ribs = rib_keep * (0.06 * rib_core + 0.04 * rib_cortex)
  # Clavicles: bands from the manubrium out and up across the apices.
  clav = np.zeros_like(x)
  clav_top = thorax_top + 0.12

  def clavicle(x, y):
    ax = np.abs(x)
    cy = clav_top - 0.28 * (ax - 0.1) + 0.25 * (ax - 0.1) ** 2
    return (_smooth_inside(np.abs(y - cy) - 0.035, edge)
            * _smooth_inside(np.maximum(0.06 - ax, ax - 0.72), 2 * edge))

  _paint_max(clav, pose, x, y, (-0.8, clav_top - 0.25, 0.8, clav_top + 0.1),
             clavicle)
  # Humeral heads at the top corners, at the body's side.
  for sx in (-1.0, 1.0):
    hx = sx * (thorax_hw + wall)
    _paint_max(clav, pose, x, y, (hx - 0.16, -0.96, hx + 0.16, -0.6),
               lambda x, y: 1.4 * _smooth_inside(
                   _ellipse_sdist(x, y, hx, -0.78, 0.13, 0.15), edge))
  # Spine: vertebral bodies with darker disc spaces.
  spine = _smooth_inside(ax - 0.075, edge)
  disc = np.abs(((y - thorax_top) * (1 / 0.11)) % 1.0 - 0.5)  # 0.5: a disc.
  spine *= 1.0 - 0.35 * np.clip((disc - 0.38) * (1 / 0.12), 0, 1)
  trachea = _smooth_inside(np.maximum(np.abs(x - 0.005) - 0.035, y + 0.32),
                           edge)

  # Stomach gas: a dark pocket right under the image-right dome.
  gas = np.zeros_like(x)
  if has_bubble:
    gx = (0.3 + 0.2 * bubble[0]) * thorax_hw
    gy = dome_img_right + 0.04 + (0.02 + 2.0 * (gx - 0.36 * thorax_hw / 0.75)
                                  ** 2) + 0.03 * bubble[1]
    ga, gb = 0.09 + 0.05 * bubble[2], 0.06
    _paint_max(gas, pose, x, y, (gx - ga - edge, gy - gb - edge,
                                 gx + ga + edge, gy + gb + edge),
               lambda x, y: _smooth_inside(
                   _ellipse_sdist(x, y, gx, gy, ga, gb), 2 * edge))
    gas *= abdomen

  # --- Compose densities (0 = air, ~1 = bone / metal). Bones show most
  # against air, so their weight grows with the lung behind them. ---
  v = (0.04 + 0.38 * body * (1 - 0.4 * trachea) + 0.22 * core - 0.47 * air
       - 0.25 * gas
       + spine * (0.06 + 0.08 * air) + ribs * (0.3 + 0.7 * lung)
       + 0.14 * clav * body)

  # --- Devices, drawn on the patient (they move with the pose). ---
  device = np.zeros_like(v)

  def stroke(pts, half_width, gain):
    # Segment by segment, each in its own small window: a long wire then
    # costs about its own area, not the image's times its segment count.
    m = half_width + 2 * px
    for (ax0, ay0), (ax1, ay1) in zip(pts[:-1].tolist(), pts[1:].tolist()):
      seg = np.array([[ax0, ay0], [ax1, ay1]])
      box = (min(ax0, ax1) - m, min(ay0, ay1) - m,
             max(ax0, ax1) + m, max(ay0, ay1) + m)
      _paint_max(device, pose, x, y, box, lambda x, y: gain * _smooth_inside(
          _polyline_dist(x, y, seg) - half_width, 2 * px))

  for w in range(num_wires):
    ctrl = wire_ctrl[w]
    start = [(-1.2 if ctrl[0, 0] < 0.5 else 1.2), -1.1 + 1.6 * ctrl[0, 1]]
    end = [-0.6 + 1.2 * ctrl[3, 0], -0.6 + 1.0 * ctrl[3, 1]]
    mid = -0.9 + 1.8 * ctrl[1:3]
    stroke(_bezier(np.array([start, mid[0], mid[1], end])), 0.004, 0.7)
    # The electrode: a snap button at the wire's end.
    stroke(np.array([end, end]), 0.03, 1.0)
  if has_pacer:
    pcx = pacer_side * (0.38 + 0.16 * pacer_xy[0])
    pcy = thorax_top + 0.05 + 0.12 * pacer_xy[1]
    # The can: a rounded box is a thick stroke along a short segment.
    stroke(np.array([[pcx - 0.04, pcy], [pcx + 0.04, pcy]]), 0.055, 1.0)
    # The lead runs medially to the superior vena cava, then down to a tip
    # whose position is drawn independently of the heart's size.
    tip = [-0.05 + 0.2 * lead_end[0], 0.12 + 0.15 * lead_end[1]]
    stroke(_bezier(np.array([
        [pcx, pcy],
        [pcx * 0.3 + 0.05 * lead_wiggle[0], thorax_top + 0.02],
        [-0.06 + 0.04 * lead_wiggle[1], -0.25 + 0.1 * lead_wiggle[2]],
        tip])), 0.007, 0.9)
  v += device * np.clip(_DEVICE_INTENSITY - v, 0, None)

  # --- Exposure: gamma, then contrast around mid-grey and an offset. ---
  v = np.clip(v, 0.0, 1.0) ** gamma
  v = (v - 0.5) * contrast + (0.5 + offset)

  # --- Detector: area downsample, blur, noise, quantise. ---
  image = _gaussian_blur(_area_down(v, f), blur_sigma)
  image += noise_sigma * np.random.default_rng(noise_seed).standard_normal(
      image.shape, dtype=np.float32)
  image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)

  heart_box = _box(heart_hard, f)
  thorax_box = _box(cavity_hard, f)
  # The CTR is measured across the patient (along canonical x), as a reader
  # measures it on a tilted film: image-axis box widths would let the tall
  # thorax's tilt shrink the ratio by up to ~7% at 5 degrees. The extents are
  # of rendered pixels, each as wide as it is.
  ctr = _extent(x, heart_hard) / _extent(x, cavity_hard)
  heart_mask = _area_down(heart_hard.astype(np.float32), f) >= 0.5
  body_mask = _area_down(body, f) >= 0.5
  return {
      "image": image_u8[..., None],
      "heart_mask": heart_mask.astype(np.uint8)[..., None],
      "body_mask": body_mask.astype(np.uint8)[..., None],
      "ctr": np.float32(ctr),
      "heart_box": heart_box,
      "thorax_box": thorax_box,
      "label": int(label),
  }


def _lung_markings(x, y, thorax_hw, mottle, vessel_gain, vessel_phase):
  """Fraction of air left by lung markings at canonical (x, y), [n, n].

  Vessels are denser near the hila and medially, branch-like streaks fan out
  from each hilum, and smooth mottling breaks the uniformity.
  """
  n = x.shape[0]
  out = 1.0 - 0.08 * np.clip(1 - np.abs(x) * (1 / thorax_hw), 0, 1)
  out += 0.03 * _upsample_noise(mottle[0], n) + 0.015 * _upsample_noise(
      mottle[1], n)
  for sx, ph in ((-1.0, vessel_phase[0]), (1.0, vessel_phase[1])):
    hx, hy = x - sx * 0.2, y + 0.1
    dist = np.hypot(hx, hy)
    out -= vessel_gain * np.exp(-((hx * 10) ** 2 + ((y + 0.12) / 0.14) ** 2))
    ang = np.arctan2(hy, sx * hx)
    # A wobbling phase breaks the radial lines into branching-looking ones.
    wob = ang * 11.0 + ph + 2.5 * np.sin(7.0 * dist + 2.0 * ang + ph)
    out -= 0.2 * np.abs(np.sin(wob)) ** 8 * np.exp(dist * (-1 / 0.3))
  return out


def _upsample_noise(grid: np.ndarray, res: int) -> np.ndarray:
  """Bilinear upsampling of a small [k, k] grid to [res, res] (smooth field)."""
  k = grid.shape[0]
  t = np.linspace(0, k - 1, res, dtype=np.float32)
  i0 = np.clip(np.floor(t).astype(int), 0, k - 2)
  w = t - i0
  rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]
  return rows[:, i0] * (1 - w)[None] + rows[:, i0 + 1] * w[None]
