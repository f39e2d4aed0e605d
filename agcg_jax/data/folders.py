"""Class-folder datasets: the layout most public chest X-ray sets ship in.

  <root>/<class folder>/**/*.png                 split made here (seeded)
  <root>/train/<class folder>/**/*.png           split given by the folders
  <root>/test/<class folder>/**/*.png

Class folders are mapped onto the two classes of `records.CLASS_NAMES` by a
class map the caller gives: {class: [folder names]}, the class named as in
`records.CLASS_NAMES` or `records.CLASS_KEYS`, e.g.

  {"No Finding": ["false"], "Cardiomegaly": ["true"]}      # ../shared/nih_cm128
  {"No Finding": ["normal"], "Cardiomegaly": ["cardiomegaly"]}

Folder names match case-insensitively. A folder the map does not name is an
error naming it, unless it is listed in `ignore` (at any level: a class
folder, or a top-level folder beside train/ and test/ such as val/). Hidden
entries (".name") are skipped; files that are not images (README, CSV) are
counted and skipped. Images may sit in sub-folders of a class folder.

Without split folders the split is by image, stratified: within each class,
files sorted by path are permuted by a seeded generator and the first
ceil(n * test_fraction) go to test. There are no patient ids in such a
layout, so one patient's images may fall on both sides.

Images are decoded by the project's one radiograph decoder (grayscale,
antialiased resize to [S, S]); optionally histogram-equalised at the stored
size (`normalize`). Nothing here imports TensorFlow Datasets or JAX: the
conversion workers import this module. The TFDS builder is `tfds_folders.py`.
"""
import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import fractions
import hashlib
import math
import multiprocessing
import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from agcg_jax import progress
from agcg_jax.data import images
from agcg_jax.data import records
from agcg_jax.errors import UserError
from agcg_jax.data.images import READ_ERRORS, conversion_kind, load_image

SPLIT_NAMES = ("train", "test")
LAYOUTS = ("class_folders", "split_folders")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# A class map for folders named after the classes themselves.
DEFAULT_CLASS_MAP = {records.CLASS_NAMES[0]: ("no_finding", "no finding",
                                              "normal"),
                     records.CLASS_NAMES[1]: ("cardiomegaly",)}
_LIST_CAP = 50
# Conversion: images timed in this process before deciding on a pool, and
# the time the rest must need here for a pool to be worth starting.
_PROBE = 32
_POOL_AFTER_S = 10.0


# ---------------------------------------------------------------------------
# Options.


def resolve_class_map(class_map: Mapping[Any, Any] | None,
                      ignore: Iterable[str] = ()) -> dict[str, int]:
  """{class: folder name(s)} -> {casefolded folder name: label}.

  Args:
    class_map: keys a class name ("No Finding"), key ("no_finding") or label
      (0, 1); values a folder name or a list of them. None: DEFAULT_CLASS_MAP.
    ignore: folder names to skip; naming one in the map too is an error.

  Raises:
    UserError: an unknown class, a folder given to two classes or also
      ignored, or a class without folders.
  """
  class_map = DEFAULT_CLASS_MAP if class_map is None else class_map
  if not isinstance(class_map, Mapping):
    raise UserError(f"class map {class_map!r}: expected {{class: [folder "
                    "names]}}, e.g. {'No Finding': ['normal'], "
                    "'Cardiomegaly': ['cardiomegaly']}")
  ignored = {str(n).casefold() for n in ignore}
  out, given = {}, set()
  for key, folders in class_map.items():
    if key in records.CLASS_NAMES:
      label = records.CLASS_NAMES.index(key)
    elif key in records.CLASS_KEYS:
      label = records.CLASS_KEYS.index(key)
    elif isinstance(key, (int, np.integer)) and 0 <= key < records.NUM_CLASSES:
      label = int(key)
    else:
      raise UserError(f"class map key {key!r}: expected one of "
                      f"{', '.join(records.CLASS_NAMES)} (or "
                      f"{', '.join(records.CLASS_KEYS)})")
    if label in given:
      raise UserError(f"class map: {records.CLASS_NAMES[label]!r} is given "
                      "twice")
    given.add(label)
    names = [folders] if isinstance(folders, str) else list(folders)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
      raise UserError(f"class map {key!r}: {folders!r} is not a list of "
                      "folder names")
    for name in names:
      folded = name.strip().casefold()
      if folded in out and out[folded] != label:
        raise UserError(f"class map: folder {name!r} is given to both "
                        f"{records.CLASS_NAMES[out[folded]]!r} and "
                        f"{records.CLASS_NAMES[label]!r}")
      if folded in ignored:
        raise UserError(f"class map: folder {name!r} is both mapped and "
                        "ignored")
      out[folded] = label
  missing = [records.CLASS_NAMES[c] for c in range(records.NUM_CLASSES)
             if c not in given]
  if missing:
    raise UserError(f"class map {dict(class_map)!r} names no folder for "
                    f"{', '.join(repr(m) for m in missing)}")
  return out


def check_options(size, seed, test_fraction, normalize, workers) -> None:
  if not isinstance(size, int) or size < 8:
    raise UserError(f"--size must be an integer of at least 8, not {size!r}")
  if not isinstance(seed, int) or seed < 0:
    raise UserError(f"--seed must be a non-negative integer, not {seed!r}")
  if not isinstance(test_fraction, (int, float)) or not (
      0 < test_fraction < 1):
    raise UserError(f"--test-fraction must be within (0, 1), not "
                    f"{test_fraction!r}")
  images.check_normalize(normalize)
  if workers is not None and (not isinstance(workers, int) or workers < 1):
    raise UserError(f"--workers must be a positive integer, not {workers!r}")


# ---------------------------------------------------------------------------
# Scanning a root.


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """One image under the root."""
  id: str        # path relative to the root, "/"-separated: the record id
  path: str      # absolute path
  label: int     # index into records.CLASS_NAMES
  split: str     # "train" / "test"
  bytes: int     # file size
  mtime_ns: int


@dataclasses.dataclass
class Scan:
  """What a root holds, mapped and split; no image read yet."""
  root: str
  layout: str                    # one of LAYOUTS
  files: list[ImageFile]         # sorted by id
  folders: dict[str, str]        # class folder (relative path) -> class name
  ignored: list[str]             # ignored folders (relative paths)
  other_files: int               # files that are not images, skipped

  def counts(self) -> dict[str, dict[str, int]]:
    return count(self.files)


def count(items: Iterable[Any]) -> dict[str, dict[str, int]]:
  """{split | "all": {class name: n}} of items with `.split` and `.label`."""
  out = {s: {c: 0 for c in records.CLASS_NAMES} for s in SPLIT_NAMES + ("all",)}
  for item in items:
    for s in (item.split, "all"):
      out[s][records.CLASS_NAMES[item.label]] += 1
  return out


def _subfolders(folder: str) -> list[os.DirEntry]:
  try:
    with os.scandir(folder) as it:
      return sorted((e for e in it if not e.name.startswith(".")),
                    key=lambda e: e.name)
  except OSError as e:
    raise UserError(f"cannot list {folder}: {e.strerror}") from None


def _list_images(folder: str, root: str, ignored: set[str]
                 ) -> tuple[list[tuple[str, str, os.stat_result]], int]:
  """(id, path, stat) of every image under `folder`, sorted; other files."""
  found, other = [], 0
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                         and d.casefold() not in ignored)
    for name in filenames:
      if name.startswith("."):
        continue
      path = os.path.join(dirpath, name)
      if not name.lower().endswith(IMAGE_SUFFIXES):
        other += 1
        continue
      try:
        stat = os.stat(path)
      except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      found.append((rel, os.path.abspath(path), stat))
  return sorted(found), other


def _test_count(n: int, test_fraction: float) -> int:
  # ceil(n * f) with f taken as the decimal it was written as: 0.2 * 15 is
  # 3.0000000000000004 in floats, which would make it 4.
  f = fractions.Fraction(str(test_fraction))
  return math.ceil(f * n)


def split_by_class(ids_labels: Sequence[tuple[str, int]], *, seed: int,
                   test_fraction: float) -> dict[str, str]:
  """Stratified, seeded split by image: {id: "train" | "test"}.

  Within each class the ids are sorted, permuted by
  `np.random.default_rng([seed, 4, label])`, and the first
  ceil(n * test_fraction) of the permutation go to test. A pure function of
  (ids, labels, seed, test_fraction).
  """
  out = {}
  for label in range(records.NUM_CLASSES):
    group = sorted(i for i, l in ids_labels if l == label)
    order = np.random.default_rng([seed, 4, label]).permutation(len(group))
    n_test = _test_count(len(group), test_fraction)
    for rank, i in enumerate(order):
      out[group[i]] = "test" if rank < n_test else "train"
  return out


def layout_of(root: str, ignore: Iterable[str] = ()) -> str:
  """"split_folders" when `root` holds a train/ or test/ folder (not ignored), else "class_folders"."""
  ignored = {str(n).casefold() for n in ignore}
  try:
    names = {e.name.casefold() for e in _subfolders(os.fspath(root)) if e.is_dir()}
  except (OSError, UserError):
    return "class_folders"
  return "split_folders" if (names - ignored) & set(SPLIT_NAMES) else "class_folders"


def scan_folders(root: str, class_map: Mapping[Any, Any] | None = None, *,
                 ignore: Iterable[str] = (), seed: int = 0,
                 test_fraction: float = 0.2) -> Scan:
  """Lists, maps and splits the images under `root`; reads no image.

  Args:
    root: a folder of class folders, or of train/ and test/ holding class
      folders (split names match case-insensitively).
    class_map: {class: [folder names]} (see `resolve_class_map`).
    ignore: folder names to skip (case-insensitive, at any level).
    seed, test_fraction: the split when the root has no split folders.

  Raises:
    UserError: no such folder, an unmapped folder, a split layout with only
      one of train/ and test/, no class folder at all.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise UserError(f"--data-dir {root} is not a folder")
  ignored = {str(n).casefold() for n in ignore}
  folder_label = resolve_class_map(class_map, ignored)
  entries = _subfolders(root)
  top = [e for e in entries if e.is_dir() and e.name.casefold() not in ignored]
  other = sum(1 for e in entries if not e.is_dir())
  ignored_found = [e.name for e in entries
                   if e.is_dir() and e.name.casefold() in ignored]
  splits = {e.name.casefold(): e for e in top if e.name.casefold() in SPLIT_NAMES}
  if splits:
    layout = "split_folders"
    if set(splits) != set(SPLIT_NAMES):
      have = next(iter(splits.values())).name
      raise UserError(f"{root} has a {have}/ folder but no "
                      f"{(set(SPLIT_NAMES) - set(splits)).pop()}/ folder: "
                      "give both split folders, or none (the split is then "
                      "made by seed)")
    for e in top:
      if e.name.casefold() not in SPLIT_NAMES:
        raise UserError(f"folder {e.path}: beside train/ and test/ it is "
                        "neither a split folder nor ignored; add "
                        f"{e.name!r} to the ignored folders")
    class_dirs = []
    for s in SPLIT_NAMES:
      for e in _subfolders(splits[s].path):
        if not e.is_dir():
          other += 1
        elif e.name.casefold() in ignored:
          ignored_found.append(f"{splits[s].name}/{e.name}")
        else:
          class_dirs.append((s, e))
  else:
    layout = "class_folders"
    class_dirs = [("", e) for e in top]
  if not class_dirs:
    raise UserError(f"no class folders in {root}: expected <class>/*.png or "
                    "train/<class>/*.png and test/<class>/*.png")

  known = sorted({n for n in folder_label})
  folders, found = {}, []
  for split, e in class_dirs:
    label = folder_label.get(e.name.casefold())
    rel = os.path.relpath(e.path, root).replace(os.sep, "/")
    if label is None:
      raise UserError(f"folder {e.path} is not in the class map (mapped: "
                      f"{', '.join(known)}); map it to a class or ignore it")
    folders[rel] = records.CLASS_NAMES[label]
    images, n_other = _list_images(e.path, root, ignored)
    other += n_other
    found += [(rel_id, path, stat, label, split)
              for rel_id, path, stat in images]
  if layout == "class_folders":
    sides = split_by_class([(f[0], f[3]) for f in found], seed=seed,
                           test_fraction=test_fraction)
  files = sorted(
      (ImageFile(id=i, path=p, label=l, split=s or sides[i],
                 bytes=st.st_size, mtime_ns=st.st_mtime_ns)
       for i, p, st, l, s in found), key=lambda f: f.id)
  return Scan(root=root, layout=layout, files=files, folders=folders,
              ignored=sorted(ignored_found), other_files=other)


def fingerprint(scan: Scan, *, size: int, normalize: str) -> str:
  """Hash of what the dataset would hold; equal hashes: nothing to redo."""
  digest = hashlib.sha256(
      f"folders-v1 size={size} normalize={normalize}\n".encode())
  for f in scan.files:
    digest.update(f"{f.split}\t{f.id}\t{f.label}\t{f.bytes}\t{f.mtime_ns}\n"
                  .encode())
  return digest.hexdigest()[:16]


def config_name(size: int, normalize: str, layout: str, test_fraction: float,
                seed: int) -> str:
  """The TFDS config name, e.g. "size128_equalize_test20_seed0".

  With split folders the split does not depend on seed or test_fraction:
  "size128_equalize_splitfolders".
  """
  if layout == "split_folders":
    return f"size{size}_{normalize}_splitfolders"
  return f"size{size}_{normalize}_test{test_fraction * 100:g}_seed{seed}"


# ---------------------------------------------------------------------------
# Conversion.


def convert_file(task: tuple[str, int, str]) -> dict[str, Any]:
  """Decodes one image (runs in a pool worker).

  Args:
    task: (path, stored size S, normalize option).

  Returns:
    {"pixels": uint8 [S, S] or None, "reason": None | "empty_file" |
     "unreadable", "error": message, "mode": PIL mode, "source_size": [w, h]}.
  """
  path, size, normalize = task
  out = {"pixels": None, "reason": None, "error": None, "mode": None,
         "source_size": None}
  try:
    if os.path.getsize(path) == 0:
      out.update(reason="empty_file", error="empty file")
      return out
    pixels, source_size, mode = load_image(path, size)
  except READ_ERRORS as e:
    out.update(reason="unreadable", error=f"{type(e).__name__}: {e}")
    return out
  out.update(pixels=images.normalize_image(pixels, normalize), mode=mode,
             source_size=list(source_size))
  return out


def _map(tasks: Sequence[tuple[str, int, str]], workers: int,
         desc: str) -> Iterator[dict[str, Any]]:
  """convert_file over tasks, in order, on up to `workers` processes.

  The first _PROBE images are converted here and timed; the pool starts only
  if the rest would take longer than _POOL_AFTER_S in this process. Small
  sources decode in about 1 ms (nih_cm128's 128 px PNGs), and there the pool
  lost: the 4,271 images at 64 px took 4.1 s in this process, 7.7 s with 2
  workers on 2 cores. "forkserver" as in NIH preparation: forking a process
  that has imported JAX or TFDS can deadlock. If the workers cannot start,
  the rest runs in this process.
  """
  done = 0
  with progress.bar(total=len(tasks), desc=desc, unit="img",
                    file=sys.stderr) as bar:
    start = time.perf_counter()
    for task in tasks[:_PROBE]:
      done += 1
      bar.update()
      yield convert_file(task)
    rest = len(tasks) - done
    per_image = (time.perf_counter() - start) / max(done, 1)
    if workers > 1 and rest * per_image > _POOL_AFTER_S:
      methods = multiprocessing.get_all_start_methods()
      context = multiprocessing.get_context(
          "forkserver" if "forkserver" in methods else "spawn")
      pool = concurrent.futures.ProcessPoolExecutor(workers,
                                                    mp_context=context)
      try:
        chunk = max(1, min(32, rest // (workers * 8)))
        for result in pool.map(convert_file, tasks[done:], chunksize=chunk):
          done += 1
          bar.update()
          yield result
      except concurrent.futures.process.BrokenProcessPool:
        print("folders: the conversion workers died or could not start; "
              "converting the rest in this process", file=sys.stderr)
      finally:
        # Also on an early stop (a bad image with strict): drop the queue.
        pool.shutdown(wait=True, cancel_futures=True)
    for task in tasks[done:]:
      bar.update()
      yield convert_file(task)


@dataclasses.dataclass
class Converted:
  """Decoded images of a scan, ready for the TFDS builder."""
  pixels_path: str                        # .npy, uint8 [N, S, S]
  examples: dict[str, list[dict[str, Any]]]  # split -> [{id, label, row}]
  report: dict[str, Any]


def convert_images(scan: Scan, pixels_path: str, *, size: int,
                   normalize: str = "none", strict: bool = True,
                   workers: int | None = None) -> Converted:
  """Decodes every image of `scan` into a uint8 [N, S, S] .npy file.

  The array is written through a memory map, so memory stays flat however
  many images there are.

  Args:
    scan: from `scan_folders`.
    pixels_path: where the .npy goes (the caller removes it when done).
    size: stored side S.
    normalize: one of images.NORMALIZE_OPTIONS.
    strict: an unreadable or empty image is a UserError naming it; False:
      skipped and counted by reason.
    workers: decoding processes; None: every core.

  Returns:
    Converted: examples per split in id order, and the report's counts.

  Raises:
    UserError: strict and a bad image; a split without images, or a class
      missing from train.
  """
  images.check_normalize(normalize)
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
  start = time.perf_counter()
  tasks = [(f.path, size, normalize) for f in scan.files]
  pixels = np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8,
                                     shape=(max(1, len(tasks)), size, size))
  examples = {s: [] for s in SPLIT_NAMES}
  kept, skipped, kinds = [], [], collections.Counter()
  non_square = 0
  results = _map(tasks, workers, "folders: converting")
  try:
    for f, r in zip(scan.files, results):
      if r["pixels"] is None:
        if strict:
          raise UserError(f"{f.path}: {r['error']} (without --strict, bad "
                          "images are counted and skipped)")
        skipped.append((f, r))
        continue
      row = len(kept)
      pixels[row] = r["pixels"]
      kept.append(f)
      kinds[conversion_kind(r["mode"])] += 1
      non_square += r["source_size"][0] != r["source_size"][1]
      examples[f.split].append({"id": f.id, "label": f.label, "row": row})
    pixels.flush()
  finally:
    results.close()
    del pixels
  for f, r in skipped[:_LIST_CAP]:
    print(f"folders: skipping {f.path}: {r['error']}", file=sys.stderr)
  if len(skipped) > _LIST_CAP:
    print(f"folders: ... and {len(skipped) - _LIST_CAP} more bad images "
          "(cohort.json lists them)", file=sys.stderr)
  counts = count(kept)
  if not examples["test"] or any(counts["train"][c] == 0
                                 for c in records.CLASS_NAMES):
    raise UserError(
        f"not enough images in {scan.root}: train {counts['train']}, test "
        f"{counts['test']}; training needs both classes and testing at "
        "least one image")
  report = {
      "counts": {"found": scan.counts(), "dataset": counts},
      "skipped": {
          "count": len(skipped),
          "by_reason": dict(sorted(collections.Counter(
              r["reason"] for _, r in skipped).items())),
          "files": [{"file": f.path, "reason": r["reason"],
                     "error": r["error"]} for f, r in skipped[:1000]]},
      "converted": {"rgba": kinds["rgba"], "16bit": kinds["16bit"],
                    "rgb": kinds["rgb"], "other": kinds["other"]},
      "non_square_stretched": int(non_square),
      "seconds": {"images": round(time.perf_counter() - start, 3)},
      "workers": workers,
  }
  return Converted(pixels_path=pixels_path, examples=examples, report=report)
