"""Radiographs with hand-drawn heart and lung outlines: cases, CTR, split.

A folder of outlined radiographs is laid out like ../shared/ctr_wingspan:

  png/<id>.png                  the radiograph (any size, any PIL mode)
  mask/heart/<id>.png           the heart, same name and size
  mask/left_lung/<id>.png       the patient's left lung
  mask/right_lung/<id>.png      the patient's right lung

Masks may be anti-aliased: a pixel is inside when its grey level is > 127.
The masks are the ground truth: the cardiothoracic ratio (CTR) is the heart's
horizontal extent over the thorax's (the outer edges of the two lungs),
measured at the file's full resolution, and the label is CTR > threshold
(Cardiomegaly, class 1) else class 0 ("No Finding"): there is no diagnosis
column, and CTR > 0.5 on a PA film is the clinical definition.

Problems of one case (a missing, unreadable or empty mask; a mask whose size
differs from its radiograph's) are one-line `CaseError`s naming the file:
fatal with `strict=True`, otherwise the case is skipped and counted by
reason in the scan's report.

This module imports neither TFDS nor JAX (`tfds_outlines.py` writes the
dataset).
"""
import collections
import dataclasses
import os
from typing import Any

import numpy as np
from PIL import Image

from agcg_jax.data import images
from agcg_jax.data import records
from agcg_jax.errors import UserError

MASK_NAMES = ("heart", "left_lung", "right_lung")
# Anti-aliased masks: inside where more than half the pixel is covered.
MASK_LEVEL = 127
CTR_THRESHOLD = 0.5
TEST_FRACTION = 0.25
SPLIT_NAMES = ("train", "test")
# Why a case can be skipped, in the order the checks run.
SKIP_REASONS = ("unreadable_image", "missing_mask", "unreadable_mask",
                "size_mismatch", "empty_mask")
# How many skipped files the report names per reason.
_LIST_CAP = 50


class CaseError(UserError):
  """One case cannot be used; `reason` is one of SKIP_REASONS, `path` the file."""

  def __init__(self, reason: str, path: str, message: str):
    super().__init__(f"{path}: {message}")
    self.reason = reason
    self.path = path


@dataclasses.dataclass(frozen=True)
class Case:
  """One radiograph and the paths its masks should have (they may not exist)."""
  id: str                      # the PNG's file name, e.g. "1.2.410....png"
  image: str                   # path of png/<id>
  masks: tuple[str, str, str]  # paths of mask/<name>/<id>, MASK_NAMES order


@dataclasses.dataclass(frozen=True)
class Measured:
  """A case that passed every check, with its CTR at full resolution."""
  case: Case
  ctr: float
  heart_width: int             # columns, full-resolution pixels
  thorax_width: int
  label: int                   # 1 iff ctr > threshold


def find_cases(root: str) -> list[Case]:
  """Every radiograph in `<root>/png/`, sorted by id.

  Raises:
    UserError: no png/ folder, or no PNG in it.
  """
  png_dir = os.path.join(root, "png")
  if not os.path.isdir(png_dir):
    raise UserError(f"no outlined radiographs in {root}: expected png/<id>.png "
                    "and mask/heart|left_lung|right_lung/<id>.png")
  ids = sorted(n for n in os.listdir(png_dir) if n.lower().endswith(".png"))
  if not ids:
    raise UserError(f"no PNG files in {png_dir}")
  return [Case(id=i, image=os.path.join(png_dir, i),
               masks=tuple(os.path.join(root, "mask", m, i)
                           for m in MASK_NAMES))
          for i in ids]


def ctr_from_masks(heart: np.ndarray, left_lung: np.ndarray,
                   right_lung: np.ndarray) -> tuple[float, int, int]:
  """The CTR of boolean masks [H, W]: (ctr, heart width, thorax width).

  Widths count columns from the first to the last one holding any mask
  pixel, both included (the thorax: both lungs together). Counting both end
  columns is what ctr_ground_truth.csv does: it agrees to 0.0012 mean
  absolute difference over its 221 cases, against 0.0015 for last - first.

  Raises:
    ValueError: an empty mask (no width to measure).
  """
  heart_width = _extent(heart, "heart")
  thorax_width = _extent(np.logical_or(left_lung, right_lung), "lungs")
  return heart_width / thorax_width, heart_width, thorax_width


def _extent(mask: np.ndarray, what: str) -> int:
  columns = np.flatnonzero(np.asarray(mask, bool).any(axis=0))
  if columns.size == 0:
    raise ValueError(f"empty {what} mask")
  return int(columns[-1] - columns[0] + 1)


def _decode(path: str) -> Image.Image:
  """A decoded grayscale image (8-bit "L"), read whole so truncation fails here."""
  with Image.open(path) as image:
    image.load()
    return images.to_gray8(image)


def _read_mask(path: str, size: tuple[int, int]) -> Image.Image:
  """A mask's grey levels, checked against the radiograph's (w, h)."""
  if not os.path.isfile(path):
    raise CaseError("missing_mask", path, "missing mask")
  try:
    grey = _decode(path)
  except images.READ_ERRORS as e:
    raise CaseError("unreadable_mask", path,
                    f"unreadable mask ({type(e).__name__}: {e})") from None
  if grey.size != size:
    raise CaseError("size_mismatch", path,
                    f"mask is {grey.size[0]}x{grey.size[1]}, its radiograph "
                    f"{size[0]}x{size[1]}")
  return grey


def _read_case(case: Case) -> tuple[Image.Image, list[Image.Image]]:
  """(radiograph, [heart, left lung, right lung] grey masks), all checked."""
  try:
    image = _decode(case.image)
  except images.READ_ERRORS as e:
    raise CaseError("unreadable_image", case.image,
                    f"unreadable radiograph ({type(e).__name__}: {e})"
                    ) from None
  masks = [_read_mask(p, image.size) for p in case.masks]
  for path, grey in zip(case.masks, masks):
    if not np.any(np.asarray(grey) > MASK_LEVEL):
      raise CaseError("empty_mask", path,
                      f"empty mask (no pixel above {MASK_LEVEL})")
  return image, masks


def measure_case(case: Case, threshold: float = CTR_THRESHOLD) -> Measured:
  """Checks one case and measures its CTR at full resolution.

  Raises:
    CaseError: a missing, unreadable, empty or wrongly sized file.
  """
  _, masks = _read_case(case)
  ctr, heart_width, thorax_width = ctr_from_masks(
      *(np.asarray(m) > MASK_LEVEL for m in masks))
  return Measured(case=case, ctr=ctr, heart_width=heart_width,
                  thorax_width=thorax_width, label=int(ctr > threshold))


def scan(root: str, *, strict: bool = False, threshold: float = CTR_THRESHOLD
         ) -> tuple[list[Measured], dict[str, Any]]:
  """Measures every case under `root`.

  Returns:
    (the usable cases sorted by id, a report {"cases": found, "used": n,
    "skipped": {reason: count} (every reason, 0 if none), "skipped_files":
    {reason: [path, ...]} (the first few, only reasons that occurred)}).

  Raises:
    CaseError: with strict, the first problem found.
    UserError: no cases, or none usable.
  """
  cases = find_cases(root)
  used, skipped = [], collections.defaultdict(list)
  for case in cases:
    try:
      used.append(measure_case(case, threshold))
    except CaseError as e:
      if strict:
        raise
      skipped[e.reason].append(e.path)
  if not used:
    raise UserError(f"none of the {len(cases)} cases in {root} is usable: "
                    + ", ".join(f"{r} {len(p)}" for r, p in skipped.items()))
  report = {"cases": len(cases), "used": len(used),
            "skipped": {r: len(skipped[r]) for r in SKIP_REASONS},
            "skipped_files": {r: skipped[r][:_LIST_CAP] for r in SKIP_REASONS
                              if skipped[r]}}
  return used, report


def _binary(grey: Image.Image, size: int) -> np.ndarray:
  """A grey mask -> uint8 [S, S] in {0, 1}: area-averaged, then > 127."""
  return (np.asarray(images.resize_square(grey, size)) > MASK_LEVEL
          ).astype(np.uint8)


def load_case(measured: Measured, size: int) -> dict[str, Any]:
  """One case in the stored format at side `size`.

  The radiograph takes the same path as every other image of the project
  (`images.to_gray8`, then `images.resize_square`: area-averaging down).
  Each mask is resized the same way from its anti-aliased grey levels and
  then thresholded, so a stored pixel is inside when more than half of it
  was. The CTR is the full-resolution one: at 64 px one column is ~2% of a
  thorax, too coarse for the truth.

  Returns:
    {"image": uint8 [S, S, 1], "label": int64, "id": str, "heart_mask":
    uint8 [S, S, 1] in {0, 1}, "lung_mask": uint8 [S, S, 1] in {0, 1}
    (both lungs), "ctr": float32}.

  Raises:
    CaseError: a file changed since it was measured.
  """
  image, (heart, left, right) = _read_case(measured.case)
  lungs = np.maximum(_binary(left, size), _binary(right, size))
  return {
      "image": np.asarray(images.resize_square(image, size), np.uint8)[..., None],
      "label": np.int64(measured.label),
      "id": measured.case.id,
      "heart_mask": _binary(heart, size)[..., None],
      "lung_mask": lungs[..., None],
      "ctr": np.float32(measured.ctr),
  }


def num_test(n: int, test_fraction: float) -> int:
  """Test cases of a class of n: round(n * fraction), leaving >= 1 to train."""
  return min(max(n - 1, 0), int(round(n * test_fraction)))


def split_cases(measured: list[Measured], *, seed: int,
                test_fraction: float = TEST_FRACTION
                ) -> dict[str, list[Measured]]:
  """A seeded train / test split, stratified by label.

  Each file is one patient here (the Wingspan set holds one radiograph per
  patient), so splitting files is splitting patients. Within each label the
  cases are sorted by id, permuted by a generator seeded with (seed,
  label), and the first `num_test` go to test: the split depends only on
  the seed and the set of (id, label), not on listing order.

  Returns:
    {"train": [...], "test": [...]}, each sorted by id.
  """
  if not 0.0 < test_fraction < 1.0:
    raise UserError(f"test fraction {test_fraction}: must be within (0, 1)")
  out = {s: [] for s in SPLIT_NAMES}
  for label in range(records.NUM_CLASSES):
    group = sorted((m for m in measured if m.label == label),
                   key=lambda m: m.case.id)
    order = np.random.default_rng([seed, label]).permutation(len(group))
    k = num_test(len(group), test_fraction)
    out["test"] += [group[i] for i in order[:k]]
    out["train"] += [group[i] for i in order[k:]]
  return {s: sorted(v, key=lambda m: m.case.id) for s, v in out.items()}


def count_labels(measured: list[Measured]) -> dict[str, int]:
  """{class name: cases} in CLASS_NAMES order."""
  counts = collections.Counter(m.label for m in measured)
  return {name: counts[i] for i, name in enumerate(records.CLASS_NAMES)}
