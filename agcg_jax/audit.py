"""Confounder audit: how well the label is predicted without looking at the heart.

An explanation method trained to translate one cohort into the other learns
whatever differs between the cohorts. If the label can be predicted from
things that are not the heart (view, age, sex; exposure, body habitus,
collimation), the translations may show those differences rather than the
disease. This module measures that, on the training split:

  (a) non-image fields alone (view, age band, sex: whatever the data carry);
  (b) image statistics taken outside the heart region (`outside_heart_features`).

Each is the cross-validated accuracy (stratified, seeded k-fold) of a small
L2-regularised logistic regression, beside the majority baseline of the same
folds. Pure numpy, no JAX: the audit runs on the host, on a few thousand
images at most.
"""
from __future__ import annotations

import typing
from typing import Any, Mapping, Sequence

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)
FEATURE_NAMES = tuple(f"p{q:02d}" for q in PERCENTILES) + (
    "body_width", "body_height", "collimation_rows", "collimation_cols")
# A column (row) is in the body when at least this share of its pixels
# outside the box is brighter than the image's Otsu threshold. Half keeps
# small bright things at the edges (side markers, letters) out: with 0.1 the
# width was 1.0 for most NIH images (nih_cm128, 64 px: 5-95% range 0.91-1.0
# against 0.72-1.0 with 0.5). Dark lung columns between the body's edges are
# inside the extent anyway (first to last body column).
BODY_COLUMN_SHARE = 0.5
# A border row (column) is collimated when its mean grey level is below this.
DARK_GREY = 20.0
# The default widening of the heart box before it is blanked out.
DEFAULT_WIDEN = 1.25
_NEWTON_STEPS = 50
# The heart region where a dataset gives none (class folders): the mean expert
# Cardiomegaly box of the 73 boxed NIH sample images, as fractions of the side.
STAND_IN_HEART_BOX = (0.341, 0.385, 0.812, 0.758)


def heart_box_of_prior(prior: np.ndarray, share: float = 0.25) -> tuple[float, ...] | None:
  """(x0, y0, x1, y1) fractions bounding where a prior map is >= `share` of its peak; None if empty."""
  prior = np.asarray(prior, np.float64)
  if prior.size == 0 or not np.isfinite(prior).all() or prior.max() <= 0:
    return None
  ys, xs = np.nonzero(prior >= share * prior.max())
  h, w = prior.shape
  return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def heart_box_of_boxes(boxes: np.ndarray, size: int) -> tuple[float, ...] | None:
  """The mean of [M, 4] (x0, y0, x1, y1) pixel boxes as fractions of the side; None if M = 0."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not len(boxes):
    return None
  return tuple(float(v) for v in np.clip(boxes.mean(0) / size, 0.0, 1.0))


# ---------------------------------------------------------------------------
# Image statistics outside the heart.


def outside_mask(size: int, box_xyxy_fraction: Sequence[float],
                 widen: float = DEFAULT_WIDEN) -> np.ndarray:
  """bool [S, S]: True outside the widened box.

  Args:
    size: S.
    box_xyxy_fraction: (x0, y0, x1, y1) as fractions of the side, e.g. the
      mean training heart box divided by S.
    widen: the box's width and height are multiplied by this about its
      centre (clipped to the image); 1 keeps it.
  """
  x0, y0, x1, y1 = (float(v) for v in box_xyxy_fraction)
  if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
    raise ValueError(f"box {box_xyxy_fraction}: need 0 <= x0 < x1 <= 1 and "
                     "0 <= y0 < y1 <= 1 (fractions of the side)")
  if widen <= 0:
    raise ValueError(f"widen {widen}: must be > 0")
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  hw, hh = (x1 - x0) * widen / 2, (y1 - y0) * widen / 2
  c0, c1 = (int(np.clip(np.floor((cx - hw) * size), 0, size)),
            int(np.clip(np.ceil((cx + hw) * size), 0, size)))
  r0, r1 = (int(np.clip(np.floor((cy - hh) * size), 0, size)),
            int(np.clip(np.ceil((cy + hh) * size), 0, size)))
  mask = np.ones((size, size), bool)
  mask[r0:r1, c0:c1] = False
  return mask


def otsu_thresholds(values_u8: np.ndarray) -> np.ndarray:
  """Otsu's threshold of each row of uint8 values [N, M] -> int [N].

  Pixels > threshold are the bright class.
  """
  n = values_u8.shape[0]
  offsets = (np.arange(n, dtype=np.int64) * 256)[:, None]
  hist = np.bincount((values_u8.astype(np.int64) + offsets).ravel(),
                     minlength=256 * n).reshape(n, 256).astype(np.float64)
  p = hist / hist.sum(1, keepdims=True)
  levels = np.arange(256, dtype=np.float64)
  w0 = np.cumsum(p, 1)
  mu = np.cumsum(p * levels, 1)
  mu_t = mu[:, -1:]
  denom = w0 * (1 - w0)
  with np.errstate(divide="ignore", invalid="ignore"):
    between = np.where(denom > 0, (mu_t * w0 - mu) ** 2 / denom, -1.0)
  return between.argmax(1)


def _extent(share: np.ndarray) -> np.ndarray:
  """[N, L] shares -> (last - first + 1) / L over entries >= BODY_COLUMN_SHARE."""
  hit = share >= BODY_COLUMN_SHARE
  length = share.shape[1]
  first = hit.argmax(1)
  last = length - 1 - hit[:, ::-1].argmax(1)
  return np.where(hit.any(1), (last - first + 1) / length, 0.0)


def _dark_border(means: np.ndarray) -> np.ndarray:
  """[N, L] row (column) means -> share of L in dark runs from both ends."""
  dark = means < DARK_GREY
  length = means.shape[1]
  # Length of the run of dark entries from the start (all dark: L).
  lead = np.where(dark.all(1), length, (~dark).argmax(1))
  trail = np.where(dark.all(1), 0, (~dark[:, ::-1]).argmax(1))
  return (lead + trail) / length


def outside_heart_features(images_uint8: np.ndarray,
                           box_xyxy_fraction: Sequence[float],
                           widen: float = DEFAULT_WIDEN) -> np.ndarray:
  """Image statistics that do not look at the heart, float64 [N, 9].

  Columns (FEATURE_NAMES):
    p05..p95: grey-level percentiles (5, 25, 50, 75, 95) of the pixels
      outside the widened box (the box is left out, not filled in);
    body_width, body_height: the body's extent as a fraction of the side.
      Body pixels are those brighter than the image's Otsu threshold
      (computed outside the box); a column is in the body when at least
      BODY_COLUMN_SHARE of its pixels outside the box are body pixels; the
      width is (last such column - first + 1) / S. Height likewise by rows.
    collimation_rows, collimation_cols: the share of rows (columns) in the
      runs of near-black rows (mean grey < DARK_GREY) at the top and bottom
      (left and right) borders: collimator shutters and black frames.

  Args:
    images_uint8: uint8 [N, S, S] (or [N, S, S, 1]), grayscale.
    box_xyxy_fraction: (x0, y0, x1, y1), fractions of the side: the heart
      region (e.g. the mean training heart box).
    widen: box scale about its centre before blanking (DEFAULT_WIDEN).
  """
  x = np.asarray(images_uint8)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3 or x.shape[1] != x.shape[2] or x.dtype != np.uint8:
    raise ValueError(f"images: expected uint8 [N, S, S], got {x.dtype} "
                     f"{x.shape}")
  n, size, _ = x.shape
  if n == 0:
    return np.zeros((0, len(FEATURE_NAMES)))
  outside = outside_mask(size, box_xyxy_fraction, widen)
  if not outside.any():
    raise ValueError(f"box {box_xyxy_fraction} widened by {widen} covers the "
                     "whole image")
  values = x[:, outside]                                     # [N, M]
  percentiles = np.percentile(values, PERCENTILES, axis=1).T  # [N, 5]
  threshold = otsu_thresholds(values)
  body = (x > threshold[:, None, None]) & outside             # [N, S, S]
  per_col = np.maximum(outside.sum(0), 1)
  per_row = np.maximum(outside.sum(1), 1)
  width = _extent(body.sum(1) / per_col)
  height = _extent(body.sum(2) / per_row)
  rows = _dark_border(x.mean(2))
  cols = _dark_border(x.mean(1))
  return np.column_stack([percentiles, width, height, rows, cols]).astype(
      np.float64)


# ---------------------------------------------------------------------------
# Non-image fields.


def nonimage_features(fields: Mapping[str, Sequence[Any]] | None
                      ) -> np.ndarray | None:
  """Non-image fields -> float64 [N, F], or None when there are none.

  Numeric fields (age, an age band) are one column each, used as numbers;
  any other field (view "PA"/"AP", sex "M"/"F", bool) is one-hot over its
  sorted values. Fields are taken in name order.

  Raises:
    ValueError: fields of different lengths, or a non-finite number.
  """
  if not fields:
    return None
  columns, length = [], None
  for name in sorted(fields):
    values = np.asarray(fields[name])
    if values.ndim != 1:
      raise ValueError(f"field {name!r}: expected one value per image")
    if length is not None and len(values) != length:
      raise ValueError(f"field {name!r} has {len(values)} values, others "
                       f"{length}")
    length = len(values)
    if values.dtype.kind in "iuf":
      if not np.all(np.isfinite(values)):
        raise ValueError(f"field {name!r}: non-finite values")
      columns.append(values.astype(np.float64)[:, None])
    else:
      values = values.astype(str)
      levels = np.unique(values)
      columns.append((values[:, None] == levels[None, :]).astype(np.float64))
  return np.concatenate(columns, 1)


# ---------------------------------------------------------------------------
# Cross-validated logistic regression.


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0
                     ) -> np.ndarray:
  """Fold index (int [N], 0..folds-1) of each sample, stratified and seeded.

  Each class is permuted by `np.random.default_rng([seed, 7, class])` and
  dealt round-robin onto the folds, each class starting where the previous
  one stopped, so every fold holds floor or ceil of n_c / folds of each
  class and the fold sizes differ by at most one.
  """
  labels = np.asarray(labels)
  fold = np.empty(len(labels), np.int64)
  start = 0
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    order = np.random.default_rng([seed, 7, int(c)]).permutation(idx.size)
    fold[idx[order]] = (np.arange(idx.size) + start) % folds
    start = (start + idx.size) % folds
  return fold


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """L2 logistic regression on standardised features, by Newton's method.

  Minimises mean log loss + l2 / 2 * |w|^2 (the intercept unpenalised);
  l2 = None: 1 / n, scikit-learn's default (C = 1). Features are
  standardised with this data's mean and std (constant ones become 0).

  Returns:
    (w [F + 1] with the intercept first, mean [F], std [F]).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n, d = x.shape
  l2 = 1.0 / n if l2 is None else float(l2)
  mean = x.mean(0)
  std = x.std(0)
  std = np.where(std > 1e-12, std, 1.0)
  xs = np.column_stack([np.ones(n), (x - mean) / std])
  ridge = np.full(d + 1, l2)
  ridge[0] = 1e-8  # Keeps the intercept finite when a fold has one class.
  w = np.zeros(d + 1)
  for _ in range(_NEWTON_STEPS):
    p = _sigmoid(xs @ w)
    grad = xs.T @ (p - y) / n + ridge * w
    hess = (xs.T * (p * (1 - p))) @ xs / n + np.diag(ridge)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-9:
      break
  return w, mean, std


def predict_logistic(model: tuple[np.ndarray, np.ndarray, np.ndarray],
                     x: np.ndarray) -> np.ndarray:
  """Predicted labels (int [N]) of a `fit_logistic` model."""
  w, mean, std = model
  z = w[0] + ((np.asarray(x, np.float64) - mean) / std) @ w[1:]
  return (z > 0).astype(np.int64)


class CVAccuracy(typing.NamedTuple):
  """Cross-validated accuracy beside the majority baseline of the same folds."""
  accuracy: float            # mean over folds of the held-out accuracy
  majority_baseline: float   # same, predicting each training fold's majority
  fold_accuracies: tuple[float, ...]


def cv_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5,
                seed: int = 0) -> CVAccuracy:
  """Stratified k-fold accuracy of an L2 logistic regression.

  Args:
    features: float [N, F].
    labels: int [N], 0 or 1.
    folds: k, at least 2 and at most the smaller class's count.
    seed: seeds the folds (`stratified_folds`); the fit is deterministic.

  Returns:
    CVAccuracy(accuracy, majority_baseline, fold_accuracies).

  Raises:
    ValueError: shapes disagree, non-finite features, one class only, or
      too few samples of a class for `folds`.
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(labels).astype(np.int64)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"features {x.shape} and labels {y.shape}: expected "
                     "[N, F] and [N]")
  if not np.all(np.isfinite(x)):
    raise ValueError("features: non-finite values")
  if not np.isin(y, (0, 1)).all():
    raise ValueError("labels: expected 0 or 1")
  counts = np.bincount(y, minlength=2)
  if folds < 2 or counts.min() < folds:
    raise ValueError(f"{folds}-fold cross-validation needs at least {folds} "
                     f"samples of each class (have {counts.tolist()})")
  fold = stratified_folds(y, folds, seed)
  acc, base = [], []
  for k in range(folds):
    test, train = fold == k, fold != k
    model = fit_logistic(x[train], y[train])
    acc.append(float(np.mean(predict_logistic(model, x[test]) == y[test])))
    majority = int(np.bincount(y[train], minlength=2).argmax())
    base.append(float(np.mean(y[test] == majority)))
  return CVAccuracy(float(np.mean(acc)), float(np.mean(base)), tuple(acc))


def audit(images_uint8: np.ndarray, labels: np.ndarray, *,
          box_xyxy_fraction: Sequence[float], widen: float = DEFAULT_WIDEN,
          fields: Mapping[str, Sequence[Any]] | None = None, folds: int = 5,
          seed: int = 0) -> dict[str, Any]:
  """The confounder audit of a training split.

  Args:
    images_uint8: uint8 [N, S, S] (or [N, S, S, 1]), the training images.
    labels: int [N].
    box_xyxy_fraction: the heart region, (x0, y0, x1, y1) fractions of the
      side: the mean training heart box (or a stand-in where there is none).
    widen: box scale before blanking.
    fields: non-image fields {name: [N values]} (view, age band, sex); None
      or {}: none.
    folds: k; lowered to the smaller class's count if that is fewer.
    seed: seeds the folds.

  Returns:
    {"audit_nonimage_accuracy": float | None (no fields),
     "audit_outside_heart_accuracy": float, "audit_majority_baseline":
     float, "audit_folds": k used}; accuracies None when a class has fewer
    than 2 images.
  """
  y = np.asarray(labels).astype(np.int64)
  folds = int(min(folds, np.bincount(y, minlength=2).min()))
  out = {"audit_nonimage_accuracy": None, "audit_outside_heart_accuracy": None,
         "audit_majority_baseline": None, "audit_folds": folds}
  if folds < 2:
    return out
  image_cv = cv_accuracy(
      outside_heart_features(images_uint8, box_xyxy_fraction, widen), y,
      folds=folds, seed=seed)
  out["audit_outside_heart_accuracy"] = image_cv.accuracy
  out["audit_majority_baseline"] = image_cv.majority_baseline
  other = nonimage_features(fields)
  if other is not None:
    out["audit_nonimage_accuracy"] = cv_accuracy(
        other, y, folds=folds, seed=seed).accuracy
  return out
