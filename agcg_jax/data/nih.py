"""NIH ChestX-ray14's release files: label file, boxes, cohort and splits.

Reads; writes nothing and converts no image (nih_prepare.py converts,
tfds_nih.py builds the dataset). The cohort: images whose `Finding Labels`
contain Cardiomegaly (label 1) versus exactly `No Finding` (label 0),
optionally one view only; the split is made over the label file, so it does
not change when more images are downloaded: `paper`, `patient` or
`official`.

Boxes: `BBox_List_2017.csv` gives `[x, y, w, h]` in the pixels of the
released PNG (1024 x 1024), NOT of the original scan that the label file's
`OriginalImage[Width,Height]` columns describe (2,500 to 3,000 pixels). So a
box is scaled by (stored size / decoded image size) per axis, which is right
for the release and for any downscaled copy of it whose boxes were scaled
with it (as in the test fixture).

This module imports neither TensorFlow Datasets nor JAX.
"""
import collections
import csv
import dataclasses
import os
import re
from typing import Iterable, Sequence

import numpy as np

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
  sex: str = ""      # "M" / "F" from "Patient Gender" ("" where the file has no such column)


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
  controls: dict | None = None      # control_cohort's report (None: no controls)

  def counts(self, present: bool = False) -> dict[str, dict[str, int]]:
    """{"train" | "test" | "all": {class name: images}}."""
    return count_by_split(self.entries, lambda e: not present or e.name in self.paths)

  def missing(self) -> list[str]:
    return sorted(e.name for e in self.entries if e.name not in self.paths)


def count_by_split(entries: Iterable[Entry], keep=lambda e: True):
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
      sex_col = header.index("Patient Gender") if "Patient Gender" in header else None
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
                             view=view,
                             sex=(row[sex_col].strip().upper()
                                  if sex_col is not None and sex_col < len(row) else "")))
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


def seeded_rng(seed: int, *tags: int) -> np.random.Generator:
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
      order = seeded_rng(seed, 1, label).permutation(len(group))
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
      for i in seeded_rng(seed, 2, stratum).permutation(len(patients)):
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


def check_options(size, views, split, balance, seed, workers):
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


# Cohort controls (`controls`, comma-separated): what else than the disease may separate the
# two cohorts is taken out before the split.
CONTROL_OPTIONS = ("one_per_patient", "match_age_sex")
AGE_BAND = 10  # years


def parse_controls(controls: str) -> tuple[str, ...]:
  """"match_age_sex, one_per_patient" -> the known controls in CONTROL_OPTIONS order."""
  names = {c.strip() for c in str(controls or "").split(",") if c.strip()}
  unknown = sorted(names - set(CONTROL_OPTIONS))
  if unknown:
    raise UserError(f"cohort controls {unknown}: use any of {', '.join(CONTROL_OPTIONS)}")
  return tuple(c for c in CONTROL_OPTIONS if c in names)


def control_cohort(entries: list[Entry], controls: Sequence[str],
                   seed: int) -> tuple[list[Entry], dict]:
  """Applies the cohort controls to the label file's cohort rows.

  one_per_patient: one image per patient: a patient with any Cardiomegaly
    image keeps the first of those (by file name), others their first No
    Finding image; follow-ups of one patient are not independent samples.
  match_age_sex: in every (10-year age band, sex) stratum at most as many No
    Finding images as Cardiomegaly images (a seeded draw), so age and sex no
    longer predict the label; strata without Cardiomegaly keep no No Finding.

  Returns:
    (kept entries in file order, {"controls", "before", "after"} counts by class).
  """
  count = lambda es: {records.CLASS_NAMES[c]: sum(e.label == c for e in es) for c in (0, 1)}
  report = {"controls": list(controls), "before": count(entries)}
  kept = list(entries)
  if "one_per_patient" in controls:
    by_patient = collections.defaultdict(list)
    for e in kept:
      by_patient[e.patient].append(e)
    chosen = {id(min(es, key=lambda e: (-e.label, e.name))) for es in by_patient.values()}
    kept = [e for e in kept if id(e) in chosen]
  if "match_age_sex" in controls:
    stratum = lambda e: (e.age // AGE_BAND if e.age >= 0 else -1, e.sex)
    strata = collections.defaultdict(lambda: ([], []))
    for e in kept:
      strata[stratum(e)][e.label].append(e)
    chosen = set()
    for i, key in enumerate(sorted(strata)):
      nf, cm = strata[key]
      chosen |= {id(e) for e in cm}
      nf = sorted(nf, key=lambda e: e.name)
      for j in seeded_rng(seed, 4, i).permutation(len(nf))[:len(cm)]:
        chosen.add(id(nf[j]))
    kept = [e for e in kept if id(e) in chosen]
  report["after"] = count(kept)
  return kept, report


def build_cohort(data_dir: str, *, views: str = "both",
                 split: str = "patient", seed: int = 0, controls: str = "") -> Cohort:
  """Reads the label, box and split files and lists the present images.

  Reads no image. Counts over the label file (`Cohort.counts()`) do not
  depend on which images are present. `controls` (CONTROL_OPTIONS,
  comma-separated) are applied before the split (`control_cohort`).
  """
  check_options(8, views, split, BALANCE_OPTIONS[0], seed, None)
  controls = parse_controls(controls)
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise UserError(f"--data-dir {data_dir} is not a folder")
  label_file = find_label_file(data_dir)
  rows, entries = read_label_file(label_file, views)
  if not entries:
    raise UserError(f"empty cohort: no {CARDIOMEGALY} or {NO_FINDING} image "
                    f"with --views {views} in {label_file}")
  control_report = None
  if controls:
    entries, control_report = control_cohort(entries, controls, seed)
  unlisted = assign_splits(entries, split, seed, data_dir)
  layout, paths = find_images(data_dir)
  bbox_file = os.path.join(data_dir, BBOX_FILE_NAME)
  if os.path.isfile(bbox_file):
    boxes = read_bbox_file(bbox_file)
  else:
    bbox_file, boxes = None, {}
  return Cohort(data_dir=data_dir, layout=layout, label_file=label_file,
                bbox_file=bbox_file, label_rows=rows, entries=entries,
                paths=paths, boxes=boxes, unlisted=unlisted, controls=control_report)


# ---------------------------------------------------------------------------
# Names and counts of a prepared cohort.


def config_name(size: int, views: str, split: str, balance: str,
                seed: int, normalize: str = "none", controls: str = "") -> str:
  """The TFDS config name, e.g. "size256_both_patient_undersample_seed0" (+ "_equalize",
  + "_onepp_agesex" for the cohort controls)."""
  name = f"size{size}_{views.lower()}_{split}_{balance}_seed{seed}"
  if normalize != "none":
    name += f"_{normalize}"
  short = {"one_per_patient": "onepp", "match_age_sex": "agesex"}
  return "_".join([name] + [short[c] for c in parse_controls(controls)])


def balanced_counts(train_counts: dict[str, int]) -> dict[str, int]:
  """{class: n} -> the undersampled counts {class: min n, "total": ...}."""
  k = min(train_counts.values())
  out = {c: k for c in train_counts}
  out["total"] = k * len(train_counts)
  return out
