"""NIH ChestX-ray14: label file, cohort, splits, boxes, image conversion.

`prepare_nih` turns a (possibly partial) download of the NIH release into the
TFDS dataset `nih_chest_xray14` (see `tfds_nih.py`):

  1. find the label file and the images (NIH layout `images/*.png`, or
     Kaggle's `images_001/images/*.png` ... `images_012/images/*.png`);
  2. the cohort: images whose `Finding Labels` contain Cardiomegaly (label 1)
     versus exactly `No Finding` (label 0), optionally one view only;
  3. a train/test split over the label file (so it does not change when more
     images are downloaded): `paper`, `patient` or `official`;
  4. decode, convert to 8-bit grayscale and resize every needed image on all
     cores, caching each result as a small PNG in `<out>/cache/size<S>/`;
  5. the TFDS builder reads the cache and writes array_record files;
  6. `<out>/cohort.json` says what went in and what was left out.

Boxes: `BBox_List_2017.csv` gives `[x, y, w, h]` in the pixels of the
released PNG (1024 x 1024), NOT of the original scan that the label file's
`OriginalImage[Width,Height]` columns describe (2,500 to 3,000 pixels). So a
box is scaled by (stored size / decoded image size) per axis, which is right
for the release and for any downscaled copy of it whose boxes were scaled
with it (as in the test fixture).

This module imports neither TensorFlow Datasets nor JAX: the conversion
workers import it, and they should start fast.
"""
import argparse
import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence
import zlib

import numpy as np
from PIL import Image
from PIL import PngImagePlugin

from agcg_jax import progress
from agcg_jax.data import records
from agcg_jax.errors import UserError

# Newest first: the 2020 file corrects some labels of the 2017 one.
LABEL_FILE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID",
                    "Patient Age", "View Position")
BBOX_FILE_NAME = "BBox_List_2017.csv"
OFFICIAL_SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
# The eight findings that have expert boxes, as `BBox_List_2017.csv` spells
# them (its "Infiltrate" is the label file's "Infiltration").
BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate",
                "Mass", "Nodule", "Pneumonia", "Pneumothorax")
_BOX_ALIASES = {"Infiltration": "Infiltrate"}
MAX_BOXES = 8

SPLIT_NAMES = ("train", "test")
VIEW_OPTIONS = ("both", "PA", "AP")
SPLIT_OPTIONS = ("patient", "paper", "official")
BALANCE_OPTIONS = ("undersample", "none")
NO_FINDING = records.CLASS_NAMES[0]
CARDIOMEGALY = records.CLASS_NAMES[1]

# How many file names the report lists: missing images are the normal case
# of a partial download (100k names), unreadable ones are worth listing.
_LIST_CAP = 50
_UNREADABLE_CAP = 1000
# Cache PNGs: zlib's run-length strategy after PNG's row filters writes 5x
# faster than PIL's default (level 6) and the files are no larger (~31 KB at
# 256 px): radiograph noise defeats longer matches anyway.
_CACHE_PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
_META_SIZE = "agcg_source_size"      # "WxH" of the decoded original
_META_MODE = "agcg_source_mode"      # PIL mode of the original
_META_BYTES = "agcg_source_bytes"    # original file size: if it changes, redo
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error,
                Image.DecompressionBombError)


# ---------------------------------------------------------------------------
# Image conversion: the one decode / grayscale / resize path for NIH images.


def to_gray8(image: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit grayscale ("L").

  RGBA / LA / P: composited over black (transparent = no signal), then
  luminance; the release's RGBA files have R = G = B and opaque alpha, so
  this is exact. 16-bit and 32-bit integers: scaled by the bit depth the
  values actually use (12-bit data in a 16-bit PNG -> x * 255 / 4095), never
  clipped to 255 the way `Image.convert("L")` does.
  """
  mode = image.mode
  if mode == "L":
    return image
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and
                                      "transparency" in image.info):
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("L")
  if mode.startswith("I") or mode == "F":
    values = np.asarray(image)
    if values.ndim != 2:
      raise ValueError(f"unsupported image mode {mode}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError("non-finite pixel values")
    values -= min(0.0, float(values.min()))
    top = float(values.max())
    if mode == "F" and top <= 1.0:
      scale = 255.0
    else:
      bits = max(8, int(math.ceil(top)).bit_length())
      scale = 255.0 / (2 ** bits - 1)
    return Image.fromarray(
        np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
  return image.convert("L")


def resize_square(gray: Image.Image, size: int) -> Image.Image:
  """Grayscale image of any size -> [size, size], antialiased.

  Downscaling averages areas: `Image.reduce` (a box filter, 0.4 ms for
  1024 -> 256 against 1.8 ms for a BOX `resize`, 8.6 for Lanczos) for exact
  integer factors, a BOX `resize` (exact area weights) otherwise. Upscaling
  is bicubic. A non-square image is stretched; boxes are scaled per axis
  the same way.
  """
  width, height = gray.size
  if (width, height) == (size, size):
    return gray
  if width % size == 0 and height % size == 0:
    return gray.reduce((width // size, height // size))
  if width >= size and height >= size:
    return gray.resize((size, size), Image.Resampling.BOX)
  return gray.resize((size, size), Image.Resampling.BICUBIC)


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int], str]:
  """Decodes one radiograph to the stored format.

  Args:
    path: a PNG (any format PIL reads).
    size: stored side length S.

  Returns:
    (uint8 [S, S] grayscale, (width, height) of the decoded file, its PIL
    mode).

  Raises:
    OSError, SyntaxError, ValueError, zlib.error: the file is corrupt or
    truncated.
  """
  with Image.open(path) as image:
    image.load()  # Decode now, so that a truncated file fails here.
    mode = image.mode
    source_size = image.size
    if source_size[0] < 1 or source_size[1] < 1:
      raise ValueError("empty image")
    stored = resize_square(to_gray8(image), size)
  return np.asarray(stored, dtype=np.uint8), source_size, mode


def conversion_kind(mode: str) -> str:
  """A PIL mode -> "L" (none needed), "rgba", "16bit", "rgb" or "other"."""
  if mode == "L":
    return "L"
  if mode in ("RGBA", "LA", "PA"):
    return "rgba"
  if mode.startswith("I") or mode == "F":
    return "16bit"
  return "rgb" if mode == "RGB" else "other"


def _read_cache(cache_path: str, size: int, source_bytes: int):
  """(source (w, h), mode) from a finished cache PNG, or None if unusable."""
  try:
    with Image.open(cache_path) as image:
      info = image.info
      if image.size != (size, size) or image.mode != "L":
        return None
      if int(info.get(_META_BYTES, -1)) != source_bytes:
        return None
      width, height = (int(v) for v in info[_META_SIZE].split("x"))
      return (width, height), info[_META_MODE]
  except (KeyError, *_READ_ERRORS):  # Absent, or not ours: convert again.
    return None


def convert_one(task: tuple[str, str, str, int]) -> dict[str, Any]:
  """Converts one image into the cache, or reads back a finished one.

  Runs in a pool worker. The cache file is written to a temporary name and
  renamed, so an interrupted run leaves either a whole file or none.

  Args:
    task: (image name, source path, cache path, stored size).

  Returns:
    {"name", "status": "converted" | "cached" | "unreadable",
     "source_size": [w, h], "mode", "error"}.
  """
  name, source, cache_path, size = task
  result = {"name": name, "status": "unreadable", "source_size": None,
            "mode": None, "error": None}
  try:
    source_bytes = os.stat(source).st_size
  except OSError as e:
    result["error"] = f"cannot stat: {e.strerror}"
    return result
  cached = _read_cache(cache_path, size, source_bytes)
  if cached is not None:
    result.update(status="cached", source_size=list(cached[0]),
                  mode=cached[1])
    return result
  try:
    pixels, source_size, mode = load_image(source, size)
  except _READ_ERRORS as e:
    result["error"] = f"{type(e).__name__}: {e}"
    return result
  meta = PngImagePlugin.PngInfo()
  meta.add_text(_META_SIZE, f"{source_size[0]}x{source_size[1]}")
  meta.add_text(_META_MODE, mode)
  meta.add_text(_META_BYTES, str(source_bytes))
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp",
                             dir=os.path.dirname(cache_path))
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(pixels).save(
          f, format="PNG", pnginfo=meta, **_CACHE_PNG_OPTIONS)
    os.replace(tmp, cache_path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):  # Disk full, no permission: the user's to fix.
      raise UserError(f"cannot write {cache_path} in --out: {e}") from None
    raise
  result.update(status="converted", source_size=list(source_size), mode=mode)
  return result


class _Converter:
  """Runs `convert_one` over tasks on `workers` processes, with a progress bar.

  One pool serves several rounds (the lazy undersampling asks for more
  images in rounds). The pool uses "forkserver": forking a process that has
  imported JAX or TFDS (both start threads) can deadlock. If the workers
  cannot start (e.g. `python -` from stdin: they cannot re-import __main__),
  the executor reports a broken pool instead of respawning forever, and the
  work goes on in this process.
  """

  def __init__(self, workers: int):
    self._workers = workers
    self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def run(self, tasks: Sequence[tuple[str, str, str, int]],
          desc: str) -> list[dict[str, Any]]:
    if not tasks:
      return []
    results = {}
    with progress.bar(total=len(tasks), desc=desc, unit="img", file=sys.stderr) as bar:
      if self._workers > 1 and len(tasks) > 1:
        try:
          if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context(
                    "forkserver" if "forkserver" in methods else "spawn"))
          chunk = max(1, min(16, len(tasks) // (self._workers * 8)))
          for r in self._pool.map(convert_one, tasks, chunksize=chunk):
            results[r["name"]] = r
            bar.update()
        except concurrent.futures.process.BrokenProcessPool:
          print("nih: the conversion workers died or could not start; "
                "converting the rest in this process", file=sys.stderr)
          self._pool, self._workers = None, 1
      for task in tasks:
        if task[0] not in results:
          results[task[0]] = convert_one(task)
          bar.update()
    return list(results.values())


# ---------------------------------------------------------------------------
# The release's files.


@dataclasses.dataclass
class Entry:
  """One cohort image of the label file."""
  name: str          # image file name, e.g. "00000001_000.png"
  label: int         # index into records.CLASS_NAMES
  patient: int
  age: int           # years; -1 where the label file has no number
  view: str          # "PA" or "AP"
  split: str = ""    # "train" / "test"; "" when no official list names it


@dataclasses.dataclass
class Box:
  finding: int       # index into BOX_FINDINGS
  x: float           # [x, y, w, h] in pixels of the released PNG
  y: float
  w: float
  h: float


@dataclasses.dataclass
class Cohort:
  """The label file's cohort, its split, and which images are present."""
  data_dir: str
  layout: str                       # "nih" or "kaggle"
  label_file: str
  bbox_file: str | None
  label_rows: int                   # rows in the label file
  entries: list[Entry]              # cohort rows (view filter applied)
  paths: dict[str, str]             # present image name -> path
  boxes: dict[str, list[Box]]
  unlisted: int = 0                 # official split: cohort rows in no list

  def counts(self, present: bool = False) -> dict[str, dict[str, int]]:
    """{"train" | "test" | "all": {class name: images}}."""
    return _count(self.entries, lambda e: not present or e.name in self.paths)

  def missing(self) -> list[str]:
    return sorted(e.name for e in self.entries if e.name not in self.paths)


def _count(entries: Iterable[Entry], keep=lambda e: True):
  out = {s: {c: 0 for c in records.CLASS_NAMES}
         for s in SPLIT_NAMES + ("all",)}
  for e in entries:
    if e.split and keep(e):
      out[e.split][records.CLASS_NAMES[e.label]] += 1
      out["all"][records.CLASS_NAMES[e.label]] += 1
  return out


def find_label_file(data_dir: str) -> str:
  """The label file in `data_dir`, the 2020 version preferred."""
  for name in LABEL_FILE_NAMES:
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise UserError(f"no label file in {data_dir}: expected "
                  f"{' or '.join(LABEL_FILE_NAMES)}")


def find_images(data_dir: str) -> tuple[str, dict[str, str]]:
  """("nih" | "kaggle", {image name: path}) for the PNGs under `data_dir`."""
  nih_dir = os.path.join(data_dir, "images")
  kaggle_dirs = sorted(
      os.path.join(data_dir, d, "images") for d in os.listdir(data_dir)
      if re.fullmatch(r"images_\d+", d)
      and os.path.isdir(os.path.join(data_dir, d, "images")))
  folders = ([nih_dir] if os.path.isdir(nih_dir) else []) + kaggle_dirs
  if not folders:
    raise UserError(f"no images in {data_dir}: expected images/*.png (NIH "
                    "layout) or images_001/images/*.png ... (Kaggle layout)")
  paths = {}
  for folder in folders:
    try:
      with os.scandir(folder) as it:
        for item in it:
          if item.name.lower().endswith(".png") and item.name not in paths:
            paths[item.name] = item.path
    except OSError as e:
      raise UserError(f"cannot list {folder}: {e.strerror}") from None
  return ("nih" if folders[0] == nih_dir else "kaggle"), paths


def _parse_age(text: str) -> int:
  # The 2017 file once wrote ages as "058Y"; months or days are not years.
  match = re.fullmatch(r"\s*(\d+)\s*([YyMmDd]?)\s*", text)
  if not match:
    return -1
  return 0 if match.group(2).upper() in ("M", "D") else int(match.group(1))


def read_label_file(path: str, views: str = "both") -> tuple[int, list[Entry]]:
  """Reads the cohort rows of the label file.

  Args:
    path: `Data_Entry_2017*.csv`.
    views: "both", "PA" or "AP".

  Returns:
    (number of rows, cohort entries in file order; split not yet set).
  """
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = [h.strip() for h in next(reader, [])]
      missing = [c for c in REQUIRED_COLUMNS if c not in header]
      if missing:
        raise UserError(f"label file {path} lacks the columns "
                        f"{', '.join(repr(c) for c in missing)}")
      col = {c: header.index(c) for c in REQUIRED_COLUMNS}
      width = max(col.values()) + 1
      entries, seen, rows = [], set(), 0
      for line, row in enumerate(reader, start=2):
        if not row or not any(row):
          continue
        rows += 1
        if len(row) < width:
          raise UserError(f"label file {path}, line {line}: "
                          f"{len(row)} fields, expected at least {width}")
        findings = [s.strip() for s in row[col["Finding Labels"]].split("|")]
        if CARDIOMEGALY in findings:
          label = 1
        elif findings == [NO_FINDING]:
          label = 0
        else:
          continue
        view = row[col["View Position"]].strip().upper()
        if views != "both" and view != views:
          continue
        name = row[col["Image Index"]].strip()
        if name in seen:
          continue
        seen.add(name)
        try:
          patient = int(row[col["Patient ID"]])
        except ValueError:
          raise UserError(f"label file {path}, line {line}: Patient ID "
                          f"{row[col['Patient ID']]!r} is not a number"
                          ) from None
        entries.append(Entry(name=name, label=label, patient=patient,
                             age=_parse_age(row[col["Patient Age"]]),
                             view=view))
  except UnicodeDecodeError:
    raise UserError(f"label file {path} is not a text CSV file") from None
  except csv.Error as e:
    raise UserError(f"label file {path}: {e}") from None
  return rows, entries


def read_bbox_file(path: str) -> dict[str, list[Box]]:
  """`BBox_List_2017.csv` -> {image name: boxes}.

  The header spells the box as four columns `Bbox [x`, `y`, `w`, `h]`, and
  rows end with empty columns.
  """
  out = collections.defaultdict(list)
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in ("Image Index", "Finding Label", "Bbox [x")
               if c not in header]
    if missing:
      raise UserError(f"box file {path} lacks the columns "
                      f"{', '.join(repr(c) for c in missing)}")
    i_name, i_finding = header.index("Image Index"), header.index(
        "Finding Label")
    i_box = header.index("Bbox [x")
    for line, row in enumerate(reader, start=2):
      if not row or not any(row):
        continue
      finding = row[i_finding].strip()
      finding = _BOX_ALIASES.get(finding, finding)
      try:
        x, y, w, h = (float(v) for v in row[i_box:i_box + 4])
      except ValueError:
        raise UserError(f"box file {path}, line {line}: the box "
                        f"{row[i_box:i_box + 4]} is not four numbers"
                        ) from None
      if finding not in BOX_FINDINGS:
        raise UserError(f"box file {path}, line {line}: unknown finding "
                        f"{finding!r}")
      out[row[i_name].strip()].append(
          Box(BOX_FINDINGS.index(finding), x, y, w, h))
  return dict(out)


def _read_list(path: str) -> set[str]:
  with open(path, encoding="utf-8") as f:
    return {line.strip() for line in f if line.strip()}


def _rng(seed: int, *tags: int) -> np.random.Generator:
  # Independent, named streams: adding a class or a step does not shift
  # the others.
  return np.random.default_rng([seed, *tags])


def _test_count(n: int) -> int:
  # ceil(n / 5), as scikit-learn's train_test_split(test_size=0.2) computes
  # it; this is what reproduces the paper's Table 1 (2776 -> 2220 / 556,
  # 60361 -> 48288 / 12073). Integer arithmetic: 0.2 * n is inexact.
  return -(-n // 5)


def assign_splits(entries: list[Entry], split: str, seed: int,
                  data_dir: str = "") -> int:
  """Sets `Entry.split` on every entry, in place.

  paper: random 80/20 by image, within each class (seeded).
  patient: random 80/20 by patient: patients are shuffled (seeded) and go to
    test until it holds a fifth of the images; patients with a Cardiomegaly
    image and those without are split separately, so both classes get about
    a fifth. No patient is on both sides.
  official: NIH's `train_val_list.txt` / `test_list.txt` in `data_dir`.

  Returns:
    How many entries no official list names (split left ""); 0 otherwise.
  """
  if split == "paper":
    for label in range(records.NUM_CLASSES):
      group = sorted((e for e in entries if e.label == label),
                     key=lambda e: e.name)
      order = _rng(seed, 1, label).permutation(len(group))
      n_test = _test_count(len(group))
      for rank, i in enumerate(order):
        group[i].split = "test" if rank < n_test else "train"
    return 0
  if split == "patient":
    by_patient = collections.defaultdict(list)
    for e in entries:
      by_patient[e.patient].append(e)
    for stratum in (0, 1):
      patients = sorted(p for p, es in by_patient.items()
                        if max(e.label for e in es) == stratum)
      target = _test_count(sum(len(by_patient[p]) for p in patients))
      taken = 0
      for i in _rng(seed, 2, stratum).permutation(len(patients)):
        side = "test" if taken < target else "train"
        for e in by_patient[patients[i]]:
          e.split = side
        if side == "test":
          taken += len(by_patient[patients[i]])
    return 0
  if split == "official":
    lists = {}
    for side, file_name in OFFICIAL_SPLIT_FILES.items():
      path = os.path.join(data_dir, file_name)
      if not os.path.isfile(path):
        raise UserError(f"--split official needs {path}, which is missing")
      lists[side] = _read_list(path)
    unlisted = 0
    for e in entries:
      e.split = ("test" if e.name in lists["test"] else
                 "train" if e.name in lists["train"] else "")
      unlisted += not e.split
    return unlisted
  raise UserError(f"--split must be one of {', '.join(SPLIT_OPTIONS)}, "
                  f"not {split!r}")


def _check_options(size, views, split, balance, seed, workers):
  if not isinstance(size, int) or size < 8:
    raise UserError(f"--size must be an integer of at least 8, not {size!r}")
  if views not in VIEW_OPTIONS:
    raise UserError(f"--views must be one of {', '.join(VIEW_OPTIONS)}, "
                    f"not {views!r}")
  if split not in SPLIT_OPTIONS:
    raise UserError(f"--split must be one of {', '.join(SPLIT_OPTIONS)}, "
                    f"not {split!r}")
  if balance not in BALANCE_OPTIONS:
    raise UserError(f"--balance must be one of {', '.join(BALANCE_OPTIONS)}, "
                    f"not {balance!r}")
  if not isinstance(seed, int) or seed < 0:
    raise UserError(f"--seed must be a non-negative integer, not {seed!r}")
  if workers is not None and (not isinstance(workers, int) or workers < 1):
    raise UserError(f"--workers must be a positive integer, not {workers!r}")


def build_cohort(data_dir: str, *, views: str = "both",
                 split: str = "patient", seed: int = 0) -> Cohort:
  """Reads the label, box and split files and lists the present images.

  Reads no image. Counts over the label file (`Cohort.counts()`) do not
  depend on which images are present.
  """
  _check_options(8, views, split, BALANCE_OPTIONS[0], seed, None)
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise UserError(f"--data-dir {data_dir} is not a folder")
  label_file = find_label_file(data_dir)
  rows, entries = read_label_file(label_file, views)
  if not entries:
    raise UserError(f"empty cohort: no {CARDIOMEGALY} or {NO_FINDING} image "
                    f"with --views {views} in {label_file}")
  unlisted = assign_splits(entries, split, seed, data_dir)
  layout, paths = find_images(data_dir)
  bbox_file = os.path.join(data_dir, BBOX_FILE_NAME)
  if os.path.isfile(bbox_file):
    boxes = read_bbox_file(bbox_file)
  else:
    bbox_file, boxes = None, {}
  return Cohort(data_dir=data_dir, layout=layout, label_file=label_file,
                bbox_file=bbox_file, label_rows=rows, entries=entries,
                paths=paths, boxes=boxes, unlisted=unlisted)


# ---------------------------------------------------------------------------
# Preparation.


def _scaled_boxes(boxes: list[Box], source_size: Sequence[int],
                  size: int) -> dict[str, Any]:
  """Boxes in released-PNG pixels -> (x0, y0, x1, y1) in stored pixels."""
  sx, sy = size / source_size[0], size / source_size[1]
  out = {"boxes": [], "box_labels": [], "cardiomegaly_box": None}
  for box in boxes[:MAX_BOXES]:
    xyxy = [min(max(v, 0.0), float(size)) for v in
            (box.x * sx, box.y * sy, (box.x + box.w) * sx,
             (box.y + box.h) * sy)]
    out["boxes"].append(xyxy)
    out["box_labels"].append(box.finding)
  for box, xyxy in zip(boxes, out["boxes"]):
    if BOX_FINDINGS[box.finding] == CARDIOMEGALY:
      out["cardiomegaly_box"] = xyxy
      break
  return out


def _fingerprint(size: int, examples: dict[str, list[dict[str, Any]]]) -> str:
  """Hash of what the TFDS dataset holds; a change triggers a rebuild."""
  digest = hashlib.sha256(f"nih-v1 size={size}\n".encode())
  for split in SPLIT_NAMES:
    for ex in sorted(examples[split], key=lambda ex: ex["id"]):
      digest.update(f"{split}\t{ex['id']}\t{ex['label']}\t"
                    f"{ex['source_size']}\n".encode())
  return digest.hexdigest()[:16]


def config_name(size: int, views: str, split: str, balance: str,
                seed: int) -> str:
  """The TFDS config name, e.g. "size256_both_patient_undersample_seed0"."""
  return f"size{size}_{views.lower()}_{split}_{balance}_seed{seed}"


Examples = dict[str, list[dict[str, Any]]]


def prepare_examples(data_dir: str, cache_dir: str, *, size: int = 256,
                     views: str = "both", split: str = "patient",
                     balance: str = "undersample", seed: int = 0,
                     strict: bool = False, workers: int | None = None
                     ) -> tuple[Examples, dict[str, Any]]:
  """Cohort, split, balance and image conversion into `cache_dir`.

  Undersampling ranks each class's training images by a seeded shuffle and
  keeps the first k readable ones of each, k the smaller class's readable
  count; the larger class is converted lazily, in rank order, so that most
  of the 48k No Finding images are never decoded.

  Returns:
    (examples, report): examples {"train" | "test": [JSON-able dict per image,
    with its cache path]}; report: counts and problems for cohort.json.
  """
  _check_options(size, views, split, balance, seed, workers)
  start = time.perf_counter()
  cohort = build_cohort(data_dir, views=views, split=split, seed=seed)
  cohort_s = time.perf_counter() - start
  missing = cohort.missing()
  if strict and missing:
    raise UserError(
        f"{len(missing)} images named in {cohort.label_file} are missing from "
        f"{cohort.data_dir} (first: {missing[0]}); without --strict they are "
        "counted and skipped")
  present = [e for e in cohort.entries if e.split and e.name in cohort.paths]
  if not present:
    raise UserError(
        f"empty cohort: none of the {len(cohort.entries)} cohort images of "
        f"{cohort.label_file} is in the image folders of {cohort.data_dir}")
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)

  os.makedirs(cache_dir, exist_ok=True)
  _remove_stale_temporaries(cache_dir)
  results = {}

  def task(e: Entry):
    return (e.name, cohort.paths[e.name], os.path.join(cache_dir, e.name), size)

  def readable(es):
    return [e for e in es if results[e.name]["status"] != "unreadable"]

  train = {c: sorted((e for e in present
                      if e.split == "train" and e.label == c),
                     key=lambda e: e.name)
           for c in range(records.NUM_CLASSES)}
  for c in train:  # Seeded rank order for undersampling.
    order = _rng(seed, 3, c).permutation(len(train[c]))
    train[c] = [train[c][i] for i in order]
  start = time.perf_counter()
  with _Converter(workers) as converter:
    if balance == "none":
      first = present
    else:
      small = min(train, key=lambda c: len(train[c]))
      first = [e for e in present if e.split == "test"] + train[small]
    for r in converter.run([task(e) for e in first], "nih: converting"):
      results[r["name"]] = r
    if balance == "undersample":
      large = 1 - small
      keep = len(readable(train[small]))
      done = 0
      while len(readable(train[large][:done])) < keep and done < len(
          train[large]):
        want = keep - len(readable(train[large][:done]))
        batch = train[large][done:done + want]
        done += len(batch)
        for r in converter.run([task(e) for e in batch],
                               f"nih: converting {records.CLASS_NAMES[large]}"):
          results[r["name"]] = r
      keep = min(keep, len(readable(train[large][:done])))
      selected_train = {c: readable(train[c][:done if c == large else None])
                        [:keep] for c in train}
    else:
      selected_train = {c: readable(train[c]) for c in train}

  convert_s = time.perf_counter() - start
  unreadable = sorted(r["name"] for r in results.values()
                      if r["status"] == "unreadable")
  if strict and unreadable:
    r = results[unreadable[0]]
    raise UserError(f"{len(unreadable)} unreadable images, first "
                    f"{cohort.paths[r['name']]}: {r['error']}")
  for name in unreadable[:_LIST_CAP]:
    print(f"nih: skipping unreadable {cohort.paths[name]}: "
          f"{results[name]['error']}", file=sys.stderr)
  if len(unreadable) > _LIST_CAP:
    print(f"nih: ... and {len(unreadable) - _LIST_CAP} more unreadable images "
          "(cohort.json lists the first "
          f"{_UNREADABLE_CAP})", file=sys.stderr)

  selected = {
      "train": [e for c in sorted(selected_train) for e in selected_train[c]],
      "test": readable([e for e in present if e.split == "test"]),
  }
  examples = {s: [] for s in SPLIT_NAMES}
  kinds = collections.Counter()
  for s in SPLIT_NAMES:
    for e in sorted(selected[s], key=lambda e: e.name):
      r = results[e.name]
      kinds[conversion_kind(r["mode"])] += 1
      ex = {"id": e.name, "label": e.label, "patient": e.patient,
            "age": e.age, "view": e.view, "cache": task(e)[2],
            "source_size": r["source_size"]}
      ex.update(_scaled_boxes(cohort.boxes.get(e.name, []),
                              r["source_size"], size))
      examples[s].append(ex)
  dataset_counts = _count(selected["train"] + selected["test"])
  if not examples["test"] or any(
      dataset_counts["train"][c] == 0 for c in records.CLASS_NAMES):
    raise UserError(
        f"empty cohort: the images present in {cohort.data_dir} give "
        f"train {dataset_counts['train']} and test {dataset_counts['test']}; "
        "training needs both classes and testing at least one image")

  label_counts = cohort.counts()
  n_train = sum(dataset_counts["train"].values())
  report = {
      "dataset": "nih_chest_xray14",
      "options": {"data_dir": os.path.abspath(cohort.data_dir), "size": size,
                  "views": views, "split": split, "balance": balance,
                  "seed": seed, "strict": strict, "workers": workers},
      "layout": cohort.layout,
      "label_file": os.path.abspath(cohort.label_file),
      "bbox_file": cohort.bbox_file and os.path.abspath(cohort.bbox_file),
      "label_file_rows": cohort.label_rows,
      "cohort_rows": len(cohort.entries),
      "counts": {
          # Over the label file: what a full download would give.
          "label_file": label_counts,
          "label_file_balanced_train": balanced_counts(label_counts["train"]),
          # Over the images found in the image folders.
          "present": cohort.counts(present=True),
          # What the TFDS dataset holds: balanced train, whole test, readable.
          "dataset": dataset_counts,
      },
      "class_weights": {
          c: (1.0 if balance == "undersample" else
              n_train / (records.NUM_CLASSES * dataset_counts["train"][c]))
          for c in records.CLASS_NAMES},
      "missing": {"count": len(missing), "files": missing[:_LIST_CAP]},
      "unreadable": {"count": len(unreadable), "files": [
          {"file": cohort.paths[n], "error": results[n]["error"]}
          for n in unreadable[:_UNREADABLE_CAP]]},
      "not_in_split_lists": cohort.unlisted,
      "converted": {"rgba": kinds["rgba"], "16bit": kinds["16bit"],
                    "rgb": kinds["rgb"], "other": kinds["other"]},
      "cache": {
          "dir": os.path.abspath(cache_dir),
          "converted_now": sum(r["status"] == "converted"
                               for r in results.values()),
          "reused": sum(r["status"] == "cached" for r in results.values()),
      },
      "boxes": {
          "images_with_boxes": sum(bool(ex["boxes"]) for s in examples
                                   for ex in examples[s]),
          "with_cardiomegaly_box": sum(ex["cardiomegaly_box"] is not None
                                       for s in examples
                                       for ex in examples[s]),
      },
      "fingerprint": _fingerprint(size, examples),
      "seconds": {"cohort": round(cohort_s, 3), "images": round(convert_s, 3)},
  }
  return examples, report


def balanced_counts(train_counts: dict[str, int]) -> dict[str, int]:
  """{class: n} -> the undersampled counts {class: min n, "total": ...}."""
  k = min(train_counts.values())
  out = {c: k for c in train_counts}
  out["total"] = k * len(train_counts)
  return out


def _remove_stale_temporaries(cache_dir: str) -> None:
  # Left by a killed run; finished cache files are never temporaries.
  with os.scandir(cache_dir) as it:
    for item in it:
      if item.name.startswith(".") and item.name.endswith(".tmp"):
        try:
          os.remove(item.path)
        except OSError:
          pass


def _write_json(path: str, obj: Any) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".cohort.", suffix=".tmp",
                             dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def prepare_nih(data_dir: str, out_dir: str, *, size: int = 256,
                views: str = "both", split: str = "patient",
                balance: str = "undersample", seed: int = 0,
                strict: bool = False, workers: int | None = None
                ) -> dict[str, Any]:
  """Prepares the TFDS dataset `nih_chest_xray14` from an NIH download.

  Safe to re-run: converted images are reused from `<out_dir>/cache/`, and a
  TFDS dataset that already holds the same examples is kept; one that does
  not (more images downloaded since) is rebuilt.

  Args:
    data_dir: the NIH release (NIH or Kaggle layout), possibly partial.
    out_dir: where `cache/`, `nih_chest_xray14/<config>/<version>/` and
      `cohort.json` go.
    size: stored side length S; images are uint8 [S, S, 1].
    views: "both", "PA" or "AP".
    split: "patient" (patient-disjoint 80/20), "paper" (80/20 by image, the
      paper's Table 1) or "official" (NIH's lists).
    balance: "undersample" (the larger class of the training split cut to the
      smaller's count, the paper's adjusted set) or "none" (class weights in
      the report); the test split is always whole.
    seed: seeds the split and the undersampling.
    strict: fail on a missing or unreadable image instead of skipping it.
    workers: conversion processes; None: every core.

  Returns:
    The report also written to `<out_dir>/cohort.json`, with `tfds_dir`, the
    folder for `tfds.builder_from_directory`.
  """
  from agcg_jax.data import tfds_nih  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out {out_dir} is not a folder")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out {out_dir}: cannot create it ({e.strerror})"
                    ) from None
  cache_dir = os.path.join(out_dir, "cache", f"size{size}")
  examples, report = prepare_examples(
      data_dir, cache_dir, size=size, views=views, split=split,
      balance=balance, seed=seed, strict=strict, workers=workers)

  config = tfds_nih.NihConfig.make(size=size, views=views, split=split,
                                   balance=balance, seed=seed)
  # TFDS refuses a config object named like a registered one: pass the name then.
  registered = {c.name for c in tfds_nih.NihChestXray14.BUILDER_CONFIGS}
  builder = tfds_nih.NihChestXray14(
      config=config.name if config.name in registered else config, data_dir=out_dir,
      prepared=(examples, report))
  version_dir = os.fspath(builder.data_dir)
  metadata_file = os.path.join(version_dir, "metadata.json")
  rebuilt = True
  if os.path.isdir(version_dir):
    try:
      with open(metadata_file) as f:
        same = json.load(f).get("fingerprint") == report["fingerprint"]
    except (OSError, ValueError):
      same = False
    if same:
      rebuilt = False
    else:
      # Other images than last time (a download grew, or files changed).
      shutil.rmtree(version_dir)
  start = time.perf_counter()
  if not progress.interactive():
    tfds.disable_progress_bar()  # TFDS's bars are carriage-return floods in a log file
  builder.download_and_prepare(
      download_dir=os.path.join(out_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  report["seconds"]["tfds"] = round(time.perf_counter() - start, 3)
  report["config"] = config.name
  report["tfds_dir"] = os.path.abspath(version_dir)
  report["tfds_rebuilt"] = rebuilt
  _write_json(os.path.join(out_dir, "cohort.json"), report)
  return report


def add_prepare_nih_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the options of `agcg prepare-nih` to `parser`."""
  parser.add_argument("--data-dir", required=True,
                      help="the NIH ChestX-ray14 download: the label file "
                      "beside images/ (NIH) or images_001/images/ ... "
                      "(Kaggle); a partial download is fine")
  parser.add_argument("--out", required=True,
                      help="output folder: cache/, the TFDS dataset, "
                      "cohort.json")
  parser.add_argument("--size", type=int, default=256,
                      help="stored image side in pixels (default 256)")
  parser.add_argument("--views", choices=VIEW_OPTIONS, default="both",
                      help="view positions to keep (default both)")
  parser.add_argument("--split", choices=SPLIT_OPTIONS, default="patient",
                      help="patient: patient-disjoint 80/20 (default); "
                      "paper: 80/20 by image, the paper's Table 1; "
                      "official: NIH's train_val_list.txt / test_list.txt")
  parser.add_argument("--balance", choices=BALANCE_OPTIONS,
                      default="undersample",
                      help="undersample: cut the larger training class to "
                      "the smaller's count (the paper's adjusted set, "
                      "default); none: keep all, record class weights")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the split and the undersampling")
  parser.add_argument("--strict", action="store_true",
                      help="fail on missing or unreadable images instead of "
                      "skipping them")
  parser.add_argument("--workers", type=int, default=None,
                      help="conversion processes (default: every core)")


def run_prepare_nih(args: argparse.Namespace) -> dict[str, Any]:
  """`agcg prepare-nih`: prepares the dataset and prints a short summary."""
  report = prepare_nih(args.data_dir, args.out, size=args.size,
                       views=args.views, split=args.split,
                       balance=args.balance, seed=args.seed,
                       strict=args.strict, workers=args.workers)
  counts = report["counts"]["dataset"]
  print(f"nih_chest_xray14/{report['config']}: "
        + "; ".join(f"{s} " + ", ".join(f"{c} {n}" for c, n in
                                          counts[s].items())
                    for s in SPLIT_NAMES))
  print(f"missing {report['missing']['count']}, unreadable "
        f"{report['unreadable']['count']}, converted now "
        f"{report['cache']['converted_now']}, reused "
        f"{report['cache']['reused']}")
  print(f"dataset: {report['tfds_dir']}")
  print(f"report:  {os.path.join(args.out, 'cohort.json')}")
  return report
