"""`agcg bench`: images/s of the AG-CycleGAN training step, compile time separately.

Random images, the real networks, losses, optimisers and sharded jitted step
(the same code path as training). Images/s counts both domains, like
../shared/peers/torch_agcg.py, so the two are comparable.
"""
import functools
import json
import time

import jax
import numpy as np

from agcg_jax import sharding as sh
from agcg_jax import state as S
from agcg_jax import steps
from agcg_jax.data.records import CLASS_KEYS


def bench_gan_step(config, *, size: int, batch_per_device: int, dtype: str, steps_n: int = 20,
                   warmup: int = 3) -> dict:
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  config.data.image_size = size
  mesh = sh.data_mesh()
  n_dev = mesh.devices.size
  global_batch = batch_per_device * n_dev
  models = S.gan_models(config.model)
  init_fn = S.make_init_fn(models, S.gan_txs(config.gan), (size, size, 1))
  rep = sh.replicated(mesh)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state = jax.jit(init_fn, out_shardings=jax.tree.map(lambda _: rep, abstract))(jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(steps.gan_train_step, models=models, cfg=config.gan),
                 donate_argnums=0, out_shardings=(jax.tree.map(lambda _: rep, abstract), rep))
  rng = np.random.default_rng(0)
  local = global_batch // jax.process_count()
  batches = [sh.to_global({k: rng.uniform(-1, 1, (local, size, size, 1)).astype(np.float32)
                           for k in CLASS_KEYS}, mesh) for _ in range(2)]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, m = compiled(state, batches[i % 2])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps_n):
    state, m = compiled(state, batches[i % 2])
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
      "jax": jax.__version__,
  }


def main(config, args) -> list[dict]:
  rows = []
  for dtype in args.dtype:
    for b in args.batch:
      row = bench_gan_step(config, size=args.size, batch_per_device=b, dtype=dtype,
                           steps_n=args.steps, warmup=args.warmup)
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows
