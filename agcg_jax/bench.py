"""`agcg bench`: images/s of the AG-CycleGAN training step, compile time separately.

`--input DATA` measures the input pipeline alone (input_bench.py): array_record ->
Grain -> device arrays, at the workers given. `--profile DIR` writes a
jax.profiler trace of the timed steps (`tensorboard --logdir DIR`, profile tab).

Random images through exactly the training code: the stage `train.gan_stage`
builds and the jitted step `train.compile_stage` compiles (real networks,
losses, optimisers, sharding, donation). Images/s counts both domains, like
../shared/peers/torch_agcg.py, so the two are comparable.
"""
import contextlib
import json
import os
import time

import jax
import numpy as np

from agcg_jax import sharding as sh
from agcg_jax import train
from agcg_jax.data.records import CLASS_KEYS
from agcg_jax.models import conv_rewrites, cpu_kernels


def bench_gan_step(config, *, size: int, batch_per_device: int, dtype: str, steps_n: int = 20,
                   warmup: int = 3, profile_dir: str | None = None) -> dict:
  """Images/s of the training step on random images; with `profile_dir`, a jax.profiler trace of
  the timed steps is written there (TensorBoard's profile plugin / xprof read it)."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  config.data.image_size = size
  config.gan.batch_per_device = batch_per_device
  config.gan.global_batch = 0
  mesh = sh.data_mesh()
  n_dev = mesh.devices.size
  stage = train.gan_stage(config, None, mesh)
  global_batch = stage.global_batch
  compiled = train.compile_stage(stage, mesh)
  state = compiled.init(compiled.key)
  rng = np.random.default_rng(0)
  local = global_batch // jax.process_count()
  batches = [sh.to_global({k: rng.uniform(-1, 1, (local, size, size, 1)).astype(np.float32)
                           for k in CLASS_KEYS}, mesh) for _ in range(2)]
  t0 = time.perf_counter()
  step = compiled.step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = step(state, batches[i % 2])
  jax.block_until_ready(m)
  trace = (jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext())
  with trace:
    t0 = time.perf_counter()
    for i in range(steps_n):
      with jax.profiler.StepTraceAnnotation("gan_step", step_num=i):
        state, m = step(state, batches[i % 2])
    m = jax.device_get(m)
    dt = time.perf_counter() - t0
  dev = jax.devices()[0]
  total = 2 * global_batch * steps_n / dt
  return {
      "impl": f"agcg-jax-{'bf16' if dtype in ('bf16', 'bfloat16') else 'fp32'}",
      "size": size, "batch_per_device": batch_per_device, "global_batch": global_batch,
      "devices": n_dev, "device": f"{dev.platform}:{dev.device_kind}",
      "steps": steps_n, "compile_s": round(compile_s, 3),
      "ms_per_step": round(1e3 * dt / steps_n, 3),
      "images_per_s": round(total, 3), "images_per_s_per_device": round(total / n_dev, 3),
      "loss_finite": bool(np.isfinite(m["g_loss"]) and np.isfinite(m["d_loss"])),
      "conv_rewrites": (rewrites := conv_rewrites.resolve(config.model.conv_rewrites)),
      # Whether the C++ kernels ran (rewrites on, CPU, built: models/cpu_kernels.py).
      "cpu_kernels": rewrites and cpu_kernels.available(),
      "jax": jax.__version__,
      **({"profile_dir": profile_dir} if profile_dir else {}),
  }


def main(config, *, size: int, batches, dtypes, steps_n: int = 20, warmup: int = 3,
         profile_dir: str | None = None) -> list[dict]:
  """One JSON row per (dtype, per-device batch), printed as it is measured."""
  rows = []
  for dtype in dtypes:
    for b in batches:
      where = profile_dir and os.path.join(profile_dir, f"{dtype}_b{b}")
      row = bench_gan_step(config, size=size, batch_per_device=b, dtype=dtype,
                           steps_n=steps_n, warmup=warmup, profile_dir=where)
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows
