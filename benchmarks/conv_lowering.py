"""XLA:CPU's convolution against two hand lowerings, per conv shape of the demo networks.

    taskset -c 0 python benchmarks/conv_lowering.py [--batch 4]

Issue 10 asks whether a cheaper conv lowering for 8-32 channels would make the
CPU step faster. For each conv of the demo networks (64 px, widths 8/16/32,
already padded, VALID, with its count per step) it times forward + both gradients (what a training
step runs) of:
  xla     lax.conv_general_dilated (what the models use);
  im2col  the k*k shifted slices concatenated on channels, one matmul;
  shifted the sum over taps of (shifted slice @ w[i, j]): k*k small matmuls;
  rewrite what the models use on the CPU (agcg_jax/models/conv_rewrites.py:
          banded matmuls for one input channel, stacked shifts + one matmul
          for one output channel, XLA's conv for the rest).
Then the attention net's upsampling layer (nearest 2x + 3x3 conv) literally
and as conv_rewrites.upsample2x_conv. It checks the gradients agree with XLA's and prints ms per call (median of 30,
after a warm-up) and XLA's time over the best other. Pin one core with
taskset (XLA's thread flags do not keep it to one).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agcg_jax.models import conv_rewrites
from agcg_jax.models.layers import pad

# (forward calls per demo GAN step, input size incl. padding, in channels, out channels, kernel,
# stride, dilation): the demo step's convolutions as its HLO lists them (batch 4; generators and
# attention nets of both directions with their cycle passes, discriminators on 4 and on 8 images).
SHAPES = (
    (24, 18, 32, 32, 3, 1, 1),  # generator residual blocks at 16 px
    (16, 34, 16, 16, 3, 1, 1),  # attention DRN blocks, dilation 1
    (8, 36, 16, 16, 3, 1, 2),   # attention DRN block, dilation 2
    (8, 40, 16, 16, 3, 1, 4),   # attention DRN block, dilation 4
    (8, 70, 1, 8, 7, 1, 1),     # c7s1 in: generators and attention nets
    (8, 70, 8, 1, 7, 1, 1),     # c7s1 out
    (8, 66, 8, 16, 3, 2, 1),    # first down-sampling
    (4, 34, 16, 32, 3, 2, 1),   # generator's second down-sampling
    (4, 18, 32, 64, 3, 1, 1),   # generator's sub-pixel upsampling at 16 px
    (4, 34, 16, 32, 3, 1, 1),   # sub-pixel upsampling at 32 px
    (4, 66, 16, 8, 3, 1, 1),    # last 3x3 at 64 px
    (2, 66, 1, 8, 4, 2, 1),     # discriminator layers (x2: also on 8 images)
    (2, 34, 8, 16, 4, 2, 1),
    (2, 18, 16, 32, 4, 2, 1),
)


def xla_conv(x, w, s, d):
  return lax.conv_general_dilated(x, w, (s, s), "VALID", rhs_dilation=(d, d),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _taps(x, k, s, d):
  n, h, wd, _ = x.shape
  ho, wo = (h - d * (k - 1) - 1) // s + 1, (wd - d * (k - 1) - 1) // s + 1
  return [x[:, i * d:i * d + s * (ho - 1) + 1:s, j * d:j * d + s * (wo - 1) + 1:s, :]
          for i in range(k) for j in range(k)]


def im2col_conv(x, w, s, d):
  k, _, c, f = w.shape
  p = jnp.concatenate(_taps(x, k, s, d), axis=-1)  # (n, ho, wo, k*k*c), ordered as HWI
  return (p.reshape(-1, k * k * c) @ w.reshape(k * k * c, f)).reshape(*p.shape[:3], f)


def shifted_conv(x, w, s, d):
  k = w.shape[0]
  return sum(t @ w[i // k, i % k] for i, t in enumerate(_taps(x, k, s, d)))


def rewrite_conv(x, w, s, d):
  return conv_rewrites.conv_general_dilated(x, w, (s, s), "VALID", rhs_dilation=(d, d),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


LOWERINGS = {"xla": xla_conv, "im2col": im2col_conv, "shifted": shifted_conv,
             "rewrite": rewrite_conv}


def upsample_rows(batch):
  """ms of the attention net's upsampling layer (32 -> 64 px, 16 -> 8 channels), literal vs rewrite."""
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 16))
  w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 8))

  def literal(x, w):
    return xla_conv(pad(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), 1, "reflect"), w, 1, 1)

  out = {}
  for name, f in (("literal", literal), ("rewrite", conv_rewrites.upsample2x_conv)):
    g = jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(jnp.tanh(f(x, w)) ** 2), argnums=(0, 1)))
    out[name] = (g(x, w)[1], _median_ms(g, x, w))
  err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            for a, b in zip(out["literal"][0], out["rewrite"][0]))
  if err > 1e-4:
    raise AssertionError(f"upsample2x_conv gradients differ from the literal layer's by {err:.1e}")
  return out["literal"][1], out["rewrite"][1]


def _median_ms(f, *args, n=30):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  totals = dict.fromkeys(LOWERINGS, 0.0)
  best_per_shape = []
  print(f"batch {args.batch}, {jax.devices()[0].device_kind}; ms per forward + both gradients")
  for count, h, ci, co, k, s, d in SHAPES:
    x = jax.random.normal(jax.random.key(0), (args.batch, h, h, ci))
    w = 0.1 * jax.random.normal(jax.random.key(1), (k, k, ci, co))
    grads = {name: jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w, s, d) ** 2),
                                              argnums=(0, 1)))
             for name, f in LOWERINGS.items()}
    ref = grads["xla"](x, w)[1]
    row = {}
    for name, g in grads.items():
      got = g(x, w)[1]
      err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(ref, got))
      if err > 1e-4:
        raise AssertionError(f"{name} gradients differ from XLA's by {err:.1e}")
      row[name] = _median_ms(g, x, w)
      totals[name] += count * row[name]
    best = min((v, n) for n, v in row.items() if n != "xla")
    best_per_shape.append(min(row.values()))
    print(f"{count:2d}x {h:3d}px {ci:2d}->{co:2d} k{k} s{s} d{d}: "
          + "  ".join(f"{n} {v:6.2f}" for n, v in row.items())
          + f"  xla/{best[1]} {row['xla'] / best[0]:.2f}")
  print("per step (calls x ms; the first layer's input gradient counted though real images skip it): "
        + "  ".join(f"{n} {v:.1f} ms" for n, v in totals.items()))
  print("per step, best lowering per shape: "
        f"{sum(c * best for c, best in zip((s[0] for s in SHAPES), best_per_shape)):.1f} ms")
  literal, rewrite = upsample_rows(args.batch)
  print(f" 4x attention upsampling 32 -> 64 px, 16 -> 8: literal {literal:.2f} ms  "
        f"upsample2x_conv {rewrite:.2f} ms  literal/rewrite {literal / rewrite:.2f}")


if __name__ == "__main__":
  main()
