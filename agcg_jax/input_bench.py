"""The input pipeline alone: array_record -> Grain -> device arrays, in images/s.

    python -m agcg_jax.input_bench DATA_DIR --batch 8 --workers 0 1 2

Measures what the training loop's `next(batches)` + transfer costs, without
a model: the real pipelines (`data.pipeline.gan_batches` /
`classifier_batches`) over a prepared dataset, each batch put on the
device(s) and waited for, as a step would wait for its input.

`prefetch_to_device` is the helper the training loop can use to overlap
that transfer with the step: it keeps `size` batches already on the device
(`jax.device_put` / `make_array_from_process_local_data` are asynchronous)
and reports the Grain state of the batch last handed out, so a checkpoint
taken with it resumes exactly where the consumer was (not `size` batches
ahead, where the underlying iterator is):

    batches = prefetch_to_device(stage.make_batches(...), size=2,
                                 sharding=sharding.batch_sharded(mesh))
    ...
    batch = next(batches)                    # global jax.Arrays
    ckpt.save(step, state, batches.get_state())
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax

from agcg_jax.data import pipeline
from agcg_jax.sharding import DevicePrefetch, to_device


def _count_images(batch: Any, kind: str) -> int:
  if kind == "gan":
    return sum(int(v.shape[0]) for v in batch.values())  # both domains
  return int(batch["image"].shape[0])


def input_throughput(data_dir: str, *, split: str = "train", kind: str = "gan",
                     batch_size: int = 8, worker_count: int = 0,
                     seconds: float | None = 10.0, batches: int | None = None,
                     warmup: int = 2, prefetch_to_device: bool = True,
                     prefetch_size: int = 2, seed: int = 0,
                     read_threads: int | None = None) -> dict[str, Any]:
  """Images/s from the prepared dataset in `data_dir` to arrays on the device.

  Each batch is consumed as a training step would: the arrays are waited
  for (`block_until_ready`) before the next batch is asked for.

  Args:
    data_dir: a prepared dataset (`agcg prepare-phantoms` / `prepare-nih`).
    split: the split to read.
    kind: "gan" (unpaired batches of both domains; images counts
      both, 2 x batch_size a batch, like `agcg bench`) or "classifier".
    batch_size: B per batch (per domain for "gan").
    worker_count: Grain worker processes (0: threads in this process).
    seconds: time the loop for this long (ignored if `batches` is given).
    batches: time exactly this many batches.
    warmup: batches taken before timing (start-up: workers, first reads).
    prefetch_to_device: wrap the iterator in `prefetch_to_device` (size
      `prefetch_size`), else put each batch on the device when taken.
    seed: shuffle seed.
    read_threads: reader threads per process (None: the pipeline's default).

  Returns:
    {"kind", "split", "image_size", "batch_size", "worker_count",
     "prefetch" (0 = none), "batches", "images", "seconds", "images_per_s",
     "batches_per_s", "startup_s" (building the iterator + warmup batches),
     "device"}.
  """
  if batches is None and seconds is None:
    raise ValueError("give seconds or batches")
  if kind not in ("gan", "classifier"):
    raise ValueError(f"kind {kind!r}: expected 'gan' or 'classifier'")
  t_start = time.perf_counter()
  source = pipeline.open_source(data_dir, split)
  threads = {} if read_threads is None else {"read_threads": read_threads}
  if kind == "gan":
    it = pipeline.gan_batches(source, batch_size=batch_size, seed=seed,
                              worker_count=worker_count, **threads)
  else:
    it = pipeline.classifier_batches(source, batch_size=batch_size, seed=seed,
                                     worker_count=worker_count, **threads)
  grain_it = it
  if prefetch_to_device:
    it = DevicePrefetch(grain_it, size=prefetch_size)
  else:
    it = (to_device(b, None) for b in grain_it)
  try:
    for _ in range(warmup):
      jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    startup = t0 - t_start
    n_batches = n_images = 0
    while True:
      batch = jax.block_until_ready(next(it))
      n_batches += 1
      n_images += _count_images(batch, kind)
      elapsed = time.perf_counter() - t0
      if (n_batches >= batches) if batches is not None else (elapsed >= seconds):
        break
  finally:
    grain_it.close()  # stops Grain's worker processes now, not at garbage collection
  dev = jax.devices()[0]
  image = batch["no_finding" if kind == "gan" else "image"]
  return {
      "kind": kind, "split": split, "image_size": int(image.shape[1]),
      "batch_size": batch_size, "worker_count": worker_count,
      "prefetch": prefetch_size if prefetch_to_device else 0,
      "batches": n_batches, "images": n_images, "seconds": round(elapsed, 6),
      "images_per_s": round(n_images / elapsed, 1),
      "batches_per_s": round(n_batches / elapsed, 2),
      "startup_s": round(startup, 3), "device": f"{dev.platform}:{dev.device_kind}",
  }


def main(argv=None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("data_dir")
  p.add_argument("--split", default="train")
  p.add_argument("--pipeline", default="gan", choices=("gan", "classifier"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--workers", type=int, nargs="+", default=[0])
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--no-prefetch", action="store_true")
  a = p.parse_args(argv)
  rows = []
  for workers in a.workers:
    row = input_throughput(a.data_dir, split=a.split, kind=a.pipeline,
                           batch_size=a.batch, worker_count=workers,
                           seconds=a.seconds, prefetch_to_device=not a.no_prefetch)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
