"""Grain pipelines over a prepared TFDS dataset (phantoms or NIH).

One place turns records into model inputs: images through
`records.to_float` (uint8 [S, S, 1] -> float32 in [-1, 1]), labels to int32.

All training iterators are infinite, deterministic functions of their seed
and shard, and checkpointable: `it.get_state()` after k batches, given to
`set_state` of a freshly built iterator, makes it yield exactly the batches
the first would have yielded next (Orbax saves that state beside the model).

Sharding is per process. Training: one global shuffled stream (the same on
every process), cut into global batches of B * shard_count; process
`shard_index` reads only its B records of each, so the global batches are a
function of (seed, step) alone, whatever the number of processes.
Evaluation: each process reads a contiguous block. The caller assembles the
global batch (`jax.make_array_from_process_local_data`).

Workers: `worker_count=0` (the default) decodes in threads of this process;
`worker_count > 0` adds Grain worker processes, which re-import this module
and the data source.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from agcg_jax.data import records
from agcg_jax.errors import UserError

_INFO_FILE = "dataset_info.json"
# Threads that read and decode records ahead of the consumer; 2 matches the
# small CPU hosts this also runs on, and array_record reads release the GIL.
_READ_THREADS = 2
# Records buffered ahead per pipeline: enough to hide read latency, small
# enough that restoring a state (which drops the buffer) wastes little.
_PREFETCH = 64


# --------------------------------------------------------------------------
# Finding and opening a prepared dataset.
# --------------------------------------------------------------------------


def find_dataset_dir(data_dir: str) -> str:
  """The single TFDS version directory at or under `data_dir`.

  Looks for `dataset_info.json` in `data_dir` itself and up to three levels
  down (`<data_dir>/<name>/<config>/<version>/`).

  Raises:
    UserError: no prepared dataset there, or more than one.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise UserError(f"no prepared dataset in {data_dir}: it is not a folder; "
                    "run `agcg prepare-phantoms` or `agcg prepare-nih` first")
  found = []
  for depth in range(4):
    pattern = os.path.join(glob.escape(data_dir), *["*"] * depth, _INFO_FILE)
    found += [os.path.dirname(p) for p in glob.glob(pattern)]
  # TFDS builds into `incomplete.*` folders and renames them when done.
  found = sorted(d for d in found if "incomplete." not in d)
  if not found:
    raise UserError(f"no prepared dataset in {data_dir}: run "
                    "`agcg prepare-phantoms` or `agcg prepare-nih` first")
  if len(found) > 1:
    raise UserError(f"several prepared datasets in {data_dir} ("
                    + ", ".join(os.path.relpath(d, data_dir) for d in found)
                    + "): point the data dir at one of them")
  return found[0]


def _builder(data_dir: str):
  return tfds.builder_from_directory(find_dataset_dir(data_dir))


def open_source(data_dir: str, split: str):
  """A random-access source over one split of the dataset in `data_dir`.

  Returns:
    A TFDS array_record data source: `len(src)`, and `src[i]` a dict of
    numpy values / Python scalars / bytes (text) for record i.

  Raises:
    UserError: no single dataset in data_dir, or no such split.
  """
  builder = _builder(data_dir)
  if split not in builder.info.splits:
    raise UserError(f"split {split!r} is not in {builder.data_dir} (it has: "
                    + ", ".join(sorted(builder.info.splits)) + ")")
  return builder.as_data_source(split)


def dataset_info(data_dir: str) -> dict[str, Any]:
  """What a prepared dataset is, as plain Python values.

  Returns:
    dict with name (builder name, e.g. "phantom_chest_xray"), config,
    version, dir (the version directory), image_size (S), splits
    ({split: num_examples}), features ([names]) and metadata (builder
    metadata, e.g. NIH class weights; {} if none).
  """
  builder = _builder(data_dir)
  info = builder.info
  return {
      "name": info.name,
      "config": info.config_name,
      "version": str(info.version),
      "dir": os.fspath(builder.data_dir),
      "image_size": int(info.features["image"].shape[0]),
      "splits": {k: int(v.num_examples) for k, v in info.splits.items()},
      "features": list(info.features.keys()),
      "metadata": dict(info.metadata or {}),
  }


def labels_of(source) -> np.ndarray:
  """Labels of every record of `source`, int64 [len(source)], in index order.

  Reads (and decodes) every record once, in chunks; ~10k records take
  seconds.
  """
  n = len(source)
  labels = np.empty(n, np.int64)
  chunk = 256
  for lo in range(0, n, chunk):
    idx = list(range(lo, min(n, lo + chunk)))
    if hasattr(source, "__getitems__"):
      recs = source.__getitems__(idx)
    else:
      recs = [source[i] for i in idx]
    labels[lo:lo + len(idx)] = [int(r["label"]) for r in recs]
  return labels


# --------------------------------------------------------------------------
# Transforms. Module-level classes, not lambdas, so worker processes can
# unpickle them.
# --------------------------------------------------------------------------


class _ClassifierExample:
  """record -> {image: float32 [S, S, 1] in [-1, 1], label: int32[, weight]}."""

  def __init__(self, weights: np.ndarray | None, fields: tuple[str, ...] = ()):
    self._weights = weights
    self._fields = tuple(fields)

  def __call__(self, rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    label = np.int32(rec["label"])
    out = {"image": records.to_float(np.asarray(rec["image"])),
           "label": label}
    if self._weights is not None:
      out["weight"] = self._weights[label]
    for name in self._fields:
      out[name] = np.asarray(rec[name], np.float32)
    return out


def _image_only(rec: Mapping[str, Any]) -> np.ndarray:
  return records.to_float(np.asarray(rec["image"]))


class _Lookup:
  """Index into `source` -> its record (for a list of chosen indices)."""

  def __init__(self, source):
    self._source = source

  def __call__(self, index) -> Mapping[str, Any]:
    return self._source[int(index)]


class _LoadPair:
  """(index, index) -> (image, image): records are read only for this process's share."""

  def __init__(self, source):
    self._source = source

  def __call__(self, pair):
    return tuple(_image_only(self._source[int(i)]) for i in pair)


class _ProcessSlice:
  """Position j of process k's stream -> its element of the global stream.

  The global stream is cut into global batches of B * n elements; process k
  takes elements [k * B, (k + 1) * B) of each. So the sequence of global
  batches depends only on (seed, step), not on how many processes read it:
  one process with 8 devices and two with 4 train on the same batches.
  """

  def __init__(self, ds: grain.MapDataset, batch_size: int, shard_index: int,
               shard_count: int):
    self._ds = ds
    self._b, self._k, self._n = batch_size, shard_index, shard_count

  def __call__(self, j) -> Any:
    j = int(j)
    g = (j // self._b) * self._b * self._n + self._k * self._b + j % self._b
    return self._ds[g]


def _process_view(ds: grain.MapDataset, batch_size: int, shard_index: int,
                  shard_count: int) -> grain.MapDataset:
  """This process's share of an infinite global stream (see _ProcessSlice)."""
  if shard_count == 1:
    return ds
  length = len(ds) // shard_count
  return grain.MapDataset.range(length).map(
      _ProcessSlice(ds, batch_size, shard_index, shard_count))


def _domain_pair(pair) -> dict[str, np.ndarray]:
  return dict(zip(records.CLASS_KEYS, pair))


class _EvalExample:
  """Padded position -> the record's fields, or a blank one marked invalid."""

  def __init__(self, source, lo: int, hi: int, np_dtypes: Mapping[str, Any]):
    self._source = source
    self._lo, self._hi = lo, hi
    self._dtypes = dict(np_dtypes)
    self._blank = None

  def _convert(self, rec: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in rec.items():
      dtype = self._dtypes.get(key)
      if key == "image":
        out[key] = records.to_float(np.asarray(value))
      elif key == "label":
        out[key] = np.int32(value)
      elif isinstance(value, (bytes, str)) or dtype == np.object_:
        out[key] = value.decode("utf-8") if isinstance(value, bytes) else value
      else:
        out[key] = np.asarray(value, dtype=dtype)
    return out

  def __call__(self, position: int) -> dict[str, Any]:
    index = self._lo + int(position)
    if index < self._hi:
      out = self._convert(self._source[index])
      out["index"] = np.int32(index)
      out["valid"] = np.bool_(True)
      return out
    if self._blank is None:
      # Padding copies the shapes and dtypes of a real record with zeros, so
      # every batch has the same static shapes; `valid` marks it.
      real = self._convert(self._source[0])
      self._blank = {k: ("" if isinstance(v, str) else np.zeros_like(v))
                     for k, v in real.items()}
    out = dict(self._blank)
    out["index"] = np.int32(-1)
    out["valid"] = np.bool_(False)
    return out


# --------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------


def _check_shard(shard_index: int, shard_count: int) -> None:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} must be in [0, "
                     f"shard_count={shard_count})")


def _check_batch(batch_size: int) -> None:
  if batch_size < 1:
    raise UserError(f"batch size {batch_size}: must be >= 1")


def _mark_flags_parsed() -> None:
  # Grain 0.2.18 worker processes read an absl flag; in a program that did
  # not parse absl flags this raises UnparsedFlagAccessError (grain #1355).
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, worker_count: int,
             read_threads: int) -> grain.IterDataset:
  """MapDataset of examples -> IterDataset read ahead by threads/workers."""
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, read_threads), prefetch_buffer_size=_PREFETCH))
  if worker_count > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def _weights_array(class_weights) -> np.ndarray | None:
  """Class weights as float32 [NUM_CLASSES], from a sequence or mapping."""
  if class_weights is None:
    return None
  if isinstance(class_weights, Mapping):
    w = np.ones(records.NUM_CLASSES, np.float32)
    for key, value in class_weights.items():
      if key in records.CLASS_NAMES:
        w[records.CLASS_NAMES.index(key)] = value
      elif key in records.CLASS_KEYS:
        w[records.CLASS_KEYS.index(key)] = value
      elif isinstance(key, (int, np.integer)) and 0 <= key < len(w):
        w[key] = value
      else:
        raise UserError(f"class_weights key {key!r}: expected one of "
                        f"{records.CLASS_NAMES} or {records.CLASS_KEYS}")
    return w
  w = np.asarray(class_weights, np.float32)
  if w.shape != (records.NUM_CLASSES,):
    raise UserError(f"class_weights {class_weights!r}: need "
                    f"{records.NUM_CLASSES} values")
  return w


def _domain_seed(seed: int, domain: int) -> int:
  # Independent, reproducible shuffles per domain from one user seed.
  return int(np.random.SeedSequence([int(seed), domain]).generate_state(1)[0])


def classifier_batches(source, *, batch_size: int, seed: int,
                       shard_index: int = 0, shard_count: int = 1,
                       class_weights=None, fields: tuple[str, ...] = (),
                       worker_count: int = 0, read_threads: int = _READ_THREADS
                       ) -> grain.DatasetIterator:
  """Infinite shuffled classifier batches of this process's shard.

  Each epoch is a new permutation of the split derived from `seed`.

  Args:
    source: random-access records (`open_source`).
    batch_size: B, the per-process batch.
    seed: shuffle seed.
    shard_index, shard_count: this process reads the shard_index-th B
      records of each global batch of B * shard_count.
    class_weights: None, or per-class loss weights (a sequence in label
      order, or a mapping keyed by class name / key / label); then batches
      carry `weight`.
    fields: extra numeric record fields to carry as float32 (e.g. ("ctr",)
      for the CTR regressor).
    worker_count: Grain worker processes (0: threads in this process).
    read_threads: reader threads per process.

  Returns:
    An iterator with get_state() / set_state(), yielding
    {"image": float32 [B, S, S, 1] in [-1, 1], "label": int32 [B],
     "weight": float32 [B] (only with class_weights), one float32 [B, ...]
     array per extra field}.
  """
  _check_batch(batch_size)
  _check_shard(shard_index, shard_count)
  ds = grain.MapDataset.source(source)
  if len(ds) < batch_size * shard_count:
    raise UserError(f"the split has only {len(source)} records, fewer than "
                    f"one global batch of {batch_size * shard_count}")
  ds = _process_view(ds.shuffle(seed=int(seed)).repeat(), batch_size,
                     shard_index, shard_count)
  ds = ds.map(_ClassifierExample(_weights_array(class_weights), fields))
  it = _to_iter(ds, worker_count, read_threads)
  return iter(it.batch(batch_size, drop_remainder=True))


def gan_batches(source, *, batch_size: int, seed: int, shard_index: int = 0,
                shard_count: int = 1, labels: np.ndarray | None = None,
                worker_count: int = 0, read_threads: int = _READ_THREADS
                ) -> grain.DatasetIterator:
  """Infinite unpaired batches, one shuffled stream per domain.

  Each domain's records (this process's shard of them) repeat on their own,
  reshuffled every epoch of that domain, so domains of different sizes are
  both used in full.

  Args:
    source: random-access records (`open_source`).
    batch_size: B per domain, per process.
    seed: shuffle seed (each domain derives its own from it).
    shard_index, shard_count: this process reads the shard_index-th B
      images of each domain's global batch of B * shard_count.
    labels: int [len(source)] labels if already known (else read with
      `labels_of`).
    worker_count, read_threads: as in `classifier_batches`.

  Returns:
    An iterator with get_state() / set_state(), yielding
    {"no_finding": float32 [B, S, S, 1], "cardiomegaly": float32
    [B, S, S, 1]}, both in [-1, 1].

  Raises:
    UserError: a domain has no records in this shard.
  """
  _check_batch(batch_size)
  _check_shard(shard_index, shard_count)
  labels = labels_of(source) if labels is None else np.asarray(labels)
  streams = []
  for domain in range(records.NUM_CLASSES):
    idx = np.flatnonzero(labels == domain)
    if idx.size == 0:
      raise UserError(f"no {records.CLASS_NAMES[domain]!r} images among the "
                      f"{len(labels)} records: the GAN needs both classes")
    streams.append(
        grain.MapDataset.source(idx.tolist())
        .shuffle(seed=_domain_seed(seed, domain)).repeat())
  ds = _process_view(grain.experimental.ZipMapDataset(streams), batch_size,
                     shard_index, shard_count)
  ds = ds.map(_LoadPair(source)).map(_domain_pair)
  it = _to_iter(ds, worker_count, read_threads)
  return iter(it.batch(batch_size, drop_remainder=True))


def eval_batches(source, *, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, worker_count: int = 0,
                 read_threads: int = _READ_THREADS
                 ) -> Iterator[dict[str, Any]]:
  """Finite batches of this process's block of records, in index order.

  Process k reads the contiguous block [k * P, (k + 1) * P) of the split,
  P = ceil(N / shard_count), padded to a whole number of batches; every
  process yields the same number of batches, ceil(P / B), so multi-process
  evaluation steps stay in lockstep.

  Args:
    source: random-access records (`open_source`).
    batch_size: B per process.
    shard_index, shard_count: which block this process reads.
    worker_count, read_threads: as in `classifier_batches`.

  Yields:
    dicts of every field of the record, batched: image float32 [B, S, S, 1]
    in [-1, 1]; label int32 [B]; other numeric fields in their stored dtype
    ([B, ...]); text fields (id, NIH's view) as numpy str arrays [B]; plus
    index int32 [B] (position in the split, -1 for padding) and valid bool
    [B]. Padding rows are zeros / "" with valid False.
  """
  _check_batch(batch_size)
  _check_shard(shard_index, shard_count)
  n = len(source)
  if n == 0:
    return iter(())
  per_shard = -(-n // shard_count)
  lo = min(n, shard_index * per_shard)
  hi = min(n, lo + per_shard)
  num_batches = -(-per_shard // batch_size)
  features = source.dataset_info.features if hasattr(
      source, "dataset_info") else {}
  dtypes = {k: getattr(features[k], "np_dtype", None) for k in features}
  ds = grain.MapDataset.range(num_batches * batch_size).map(
      _EvalExample(source, lo, hi, dtypes))
  ds = ds.batch(batch_size, drop_remainder=True)
  it = _to_iter(ds, worker_count, read_threads)
  return iter(it)
