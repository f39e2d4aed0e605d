"""Converting an NIH cohort's images: the conversion cache, the process pool, the examples.

`prepare_examples` takes the cohort and split of nih.py, balances the
training split and converts every needed image on all cores, caching each
result as a small PNG in `<out>/cache/size<S>/` (reused by later runs); the
examples it returns are what the TFDS builder (tfds_nih.py) writes.

This module imports neither TensorFlow Datasets nor JAX: the conversion
workers import it, and they should start fast.
"""
import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from typing import Any, Sequence

from PIL import Image
from PIL import PngImagePlugin

from agcg_jax import progress
from agcg_jax.data import images
from agcg_jax.data import nih
from agcg_jax.data import records
from agcg_jax.data.nih import Box, Entry, SPLIT_NAMES
from agcg_jax.errors import UserError

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
  except (KeyError, *images.READ_ERRORS):  # Absent, or not ours: convert again.
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
    pixels, source_size, mode = images.load_image(source, size)
  except images.READ_ERRORS as e:
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


def _scaled_boxes(boxes: list[Box], source_size: Sequence[int],
                  size: int) -> dict[str, Any]:
  """Boxes in released-PNG pixels -> (x0, y0, x1, y1) in stored pixels."""
  sx, sy = size / source_size[0], size / source_size[1]
  out = {"boxes": [], "box_labels": [], "cardiomegaly_box": None}
  for box in boxes[:nih.MAX_BOXES]:
    xyxy = [min(max(v, 0.0), float(size)) for v in
            (box.x * sx, box.y * sy, (box.x + box.w) * sx,
             (box.y + box.h) * sy)]
    out["boxes"].append(xyxy)
    out["box_labels"].append(box.finding)
  for box, xyxy in zip(boxes, out["boxes"]):
    if nih.BOX_FINDINGS[box.finding] == nih.CARDIOMEGALY:
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


Examples = dict[str, list[dict[str, Any]]]


def prepare_examples(data_dir: str, cache_dir: str, *, size: int = 256,
                     views: str = "both", split: str = "patient",
                     balance: str = "undersample", seed: int = 0,
                     strict: bool = False, workers: int | None = None,
                     controls: str = "") -> tuple[Examples, dict[str, Any]]:
  """Cohort, split, balance and image conversion into `cache_dir`.

  Undersampling ranks each class's training images by a seeded shuffle and
  keeps the first k readable ones of each, k the smaller class's readable
  count; the larger class is converted lazily, in rank order, so that most
  of the 48k No Finding images are never decoded.

  Returns:
    (examples, report): examples {"train" | "test": [JSON-able dict per image,
    with its cache path]}; report: counts and problems for cohort.json.
  """
  nih.check_options(size, views, split, balance, seed, workers)
  start = time.perf_counter()
  cohort = nih.build_cohort(data_dir, views=views, split=split, seed=seed, controls=controls)
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
    order = nih.seeded_rng(seed, 3, c).permutation(len(train[c]))
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
      kinds[images.conversion_kind(r["mode"])] += 1
      ex = {"id": e.name, "label": e.label, "patient": e.patient,
            "age": e.age, "view": e.view, "sex": e.sex, "cache": task(e)[2],
            "source_size": r["source_size"]}
      ex.update(_scaled_boxes(cohort.boxes.get(e.name, []),
                              r["source_size"], size))
      examples[s].append(ex)
  dataset_counts = nih.count_by_split(selected["train"] + selected["test"])
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
                  "seed": seed, "strict": strict, "workers": workers,
                  "controls": list(nih.parse_controls(controls))},
      "controls": cohort.controls,
      "layout": cohort.layout,
      "label_file": os.path.abspath(cohort.label_file),
      "bbox_file": cohort.bbox_file and os.path.abspath(cohort.bbox_file),
      "label_file_rows": cohort.label_rows,
      "cohort_rows": len(cohort.entries),
      "counts": {
          # Over the label file: what a full download would give.
          "label_file": label_counts,
          "label_file_balanced_train": nih.balanced_counts(label_counts["train"]),
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


def _remove_stale_temporaries(cache_dir: str) -> None:
  # Left by a killed run; finished cache files are never temporaries.
  with os.scandir(cache_dir) as it:
    for item in it:
      if item.name.startswith(".") and item.name.endswith(".tmp"):
        try:
          os.remove(item.path)
        except OSError:
          pass
