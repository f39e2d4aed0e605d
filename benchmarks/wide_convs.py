"""The paper-width 3x3 convs per call: XLA's against our kernels (models/cpu_kernels.cc).

    taskset -c 0 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false \
        python benchmarks/wide_convs.py [--repeats 10]

For each conv shape of the paper's networks at 128 px (VALID, already padded, stride 1,
undilated: where the kernel runs Winograd), a jitted forward, input gradient and kernel gradient
alone, ms per call (the best of 3 means of `--repeats` calls, after one warm-up), with XLA's lax.conv_general_dilated and
with cpu_kernels.conv3x3; then each result's largest difference from a float64 numpy sum, as a
fraction of the largest value (the rounding of each). Pin one core with taskset for per-core
figures (XLA's thread flags alone do not keep it to one).
"""
import argparse
import time

import jax
import numpy as np
from jax import lax

from agcg_jax.models import cpu_kernels

# (batch, output size, in channels, out channels): the generator's residual blocks (256 at 32 px),
# its sub-pixel up-sampling convs and the attention net's undilated 64-channel convs at 128 px.
SHAPES = ((1, 32, 256, 256), (2, 32, 256, 256), (1, 32, 256, 512), (1, 32, 512, 256),
          (1, 64, 128, 256), (1, 64, 256, 128), (1, 64, 64, 64))


def _xla(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _calls(conv, x, w, g):
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  return (lambda: fwd(x, w)), (lambda: dx(x, w, g)), (lambda: dw(x, w, g))


def _ms(call, repeats: int, rounds: int = 3) -> float:
  """The best of `rounds` means over `repeats` calls (this VM's neighbours add noise, not speed)."""
  call().block_until_ready()
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      out = call()
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / repeats)
  return 1e3 * best


def _exact(x, w, g):
  """float64 forward, input gradient and kernel gradient of the VALID 3x3 conv."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  h, wd = g.shape[1:3]
  y, dx, dw = np.zeros(g.shape), np.zeros(x.shape), np.zeros(w.shape)
  for i in range(3):
    for j in range(3):
      win = x[:, i:i + h, j:j + wd]
      y += win @ w[i, j]
      dx[:, i:i + h, j:j + wd] += g @ w[i, j].T
      dw[i, j] = np.einsum("bhwc,bhwk->ck", win, g)
  return y, dx, dw


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  if not cpu_kernels.load():
    raise SystemExit("wide_convs: the CPU kernels are not built here (see the log above)")
  print("batch x size, C -> K | xla fwd / dx / dw ms | ours fwd / dx / dw ms | "
        "rounding xla / ours (fwd, dx, dw; of the largest value)")
  for batch, size, c, k in SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, size + 2, size + 2, c))
    w = jax.random.normal(keys[1], (3, 3, c, k)) / np.sqrt(9 * c)
    g = jax.random.normal(keys[2], (batch, size, size, k))
    exact = _exact(x, w, g)
    row = []
    for conv in (_xla, lambda x, w: cpu_kernels.conv3x3(x, w, 1)):
      calls = _calls(conv, x, w, g)
      times = [_ms(call, args.repeats) for call in calls]
      errors = [float(np.max(np.abs(np.asarray(call()) - e)) / np.max(np.abs(e)))
                for call, e in zip(calls, exact)]
      row.append((times, errors))
    (t0, e0), (t1, e1) = row
    fmt = lambda v, f: " / ".join(f % a for a in v)
    print(f"{batch} x {size}, {c} -> {k} | {fmt(t0, '%.1f')} | {fmt(t1, '%.1f')} | "
          f"{fmt(e0, '%.0e')} ; {fmt(e1, '%.0e')}")


if __name__ == "__main__":
  main()
