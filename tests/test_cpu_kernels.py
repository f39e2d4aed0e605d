"""Our XLA:CPU kernels (models/cpu_kernels.py, XLA FFI calls) equal XLA's convs and flax's norms."""
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from agcg_jax import models as M
from agcg_jax.models import conv_rewrites as R
from agcg_jax.models import cpu_kernels as D
from agcg_jax.models.layers import InstanceNorm

pytestmark = pytest.mark.skipif(not D.load(), reason="no C++ compiler: the kernel is not built")
_DIMS = ("NHWC", "HWIO", "NHWC")


def _lax(d, s=1):
  return lambda x, w: lax.conv_general_dilated(x, w, (s, s), "VALID", rhs_dilation=(d, d),
                                               dimension_numbers=_DIMS)


def _value_and_grads(conv, x, w):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2),
                                    argnums=(0, 1)))(x, w)


# Odd output widths (not whole register tiles), every compiled output width, an input gradient
# the kernel cannot take (8 output channels: XLA's), stride 2 with even and odd input sizes (the
# last row and column unread).
@pytest.mark.parametrize("cin, cout, d, s, hw", [
    (16, 16, 1, 1, (9, 13)), (16, 16, 2, 1, (12, 11)), (32, 32, 1, 1, (7, 9)),
    (8, 16, 4, 1, (14, 10)), (64, 16, 1, 1, (6, 5)), (16, 64, 1, 1, (5, 6)),
    (32, 32, 3, 1, (10, 10)), (8, 16, 1, 2, (17, 18)), (16, 32, 1, 2, (9, 11)),
    (32, 64, 2, 2, (12, 13)),
    # The wide kernel (channels at run time): partial 6-pixel tiles, several 64-channel output
    # chunks, two 128-channel input blocks, kernel-gradient tails of 2 and 4 input channels
    # (128, 160), dilation, stride 2; the input gradient of 128 -> 64 is a wide 64 -> 128 conv.
    (16, 128, 1, 1, (7, 9)), (128, 64, 1, 1, (5, 13)), (96, 192, 2, 1, (6, 7)),
    (160, 64, 1, 2, (9, 8)),
    # Winograd F(4x4) for a compiled width, dilated: 3 x 3 phases of 4 or 3 rows and columns.
    (64, 64, 3, 1, (10, 11))])
def test_kernel_equals_xla_forward_and_gradients(cin, cout, d, s, hw):
  x = jax.random.normal(jax.random.key(0), (3, hw[0] + 2 * d, hw[1] + 2 * d, cin))
  w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
  conv = lambda x, w: D.conv3x3(x, w, d, s)
  np.testing.assert_allclose(jax.jit(conv)(x, w), _lax(d, s)(x, w), rtol=1e-4, atol=1e-4)
  (v1, (dx1, dw1)), (v2, (dx2, dw2)) = (_value_and_grads(_lax(d, s), x, w),
                                        _value_and_grads(conv, x, w))
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in ((dx1, dx2), (dw1, dw2)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))


def _uses_kernel(fn, *args, target="agcg_conv3x3") -> bool:
  return target in str(jax.make_jaxpr(fn)(*args))


def test_conv_general_dilated_takes_the_kernel_only_where_it_applies():
  x16, w16 = jnp.ones((2, 10, 10, 16)), jnp.ones((3, 3, 16, 16))
  conv = lambda x, w, **kw: R.conv_general_dilated(x, w, kw.pop("s", (1, 1)), kw.pop("p", "VALID"),
                                                   dimension_numbers=_DIMS, **kw)
  assert _uses_kernel(conv, x16, w16)
  assert _uses_kernel(lambda x, w: conv(x, w, rhs_dilation=(2, 2)), x16, w16)
  assert _uses_kernel(lambda x, w: conv(x, w, s=(2, 2)), x16, w16)
  assert not _uses_kernel(lambda x, w: conv(x, w, s=(3, 3)), x16, w16)          # stride 3
  assert not _uses_kernel(lambda x, w: conv(x, w, s=(1, 2)), x16, w16)
  assert not _uses_kernel(lambda x, w: conv(x, w, p="SAME"), x16, w16)          # padded by XLA
  assert not _uses_kernel(lambda x, w: conv(x, w, rhs_dilation=(1, 2)), x16, w16)
  assert not _uses_kernel(conv, jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 16)))  # 3 channels
  assert not _uses_kernel(conv, x16, jnp.ones((3, 3, 16, 8)))                   # 8 outputs
  x128 = jnp.ones((1, 8, 8, 128))
  wide = D.vector_bits() >= 512  # the wide kernel needs AVX-512 (else XLA's convs)
  assert _uses_kernel(conv, x128, jnp.ones((3, 3, 128, 64))) == wide            # wide
  assert _uses_kernel(conv, x16, jnp.ones((3, 3, 16, 128))) == wide
  assert not _uses_kernel(conv, x128, jnp.ones((3, 3, 128, 48)))                # not 64k outputs
  assert not _uses_kernel(conv, jnp.ones((1, 8, 8, 72)), jnp.ones((3, 3, 72, 64)))  # not 16k in
  assert not _uses_kernel(conv, x16.astype(jnp.bfloat16), w16.astype(jnp.bfloat16))
  assert not _uses_kernel(conv, jnp.ones((2, 10, 10, 16)), jnp.ones((5, 5, 16, 16)))


def test_networks_with_rewrites_use_the_kernels():
  # That they stay the same function: tests/test_conv_rewrites.py (width 8: 16-channel blocks).
  x = jnp.zeros((2, 16, 16, 1))
  for net in (M.AttentionNet(width=8, dilations=(1, 2), rewrite=True),
              M.ResnetGenerator(width=8, num_res=1, rewrite=True)):
    params = net.init(jax.random.key(3), x)
    for target in ("agcg_conv3x3", "agcg_instance_norm", "agcg_thin", "agcg_pad"):
      assert _uses_kernel(lambda p: net.apply(p, x), params, target=target)
      assert _uses_kernel(jax.grad(lambda p: jnp.sum(net.apply(p, x))), params, target=target)
    # Every forward conv is ours, the stride-2 ones included.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda p: net.apply(p, x))(params))
  # The paper's generator at a quarter width: 32 -> 64 -> 128 channels, the sub-pixel convs to 256
  # and 128: the wide kernel takes every 3x3 the compiled widths do not.
  net = M.ResnetGenerator(width=32, num_res=1, rewrite=True)
  params = net.init(jax.random.key(3), x)
  jaxpr = str(jax.make_jaxpr(lambda p: net.apply(p, x))(params))
  assert ("conv_general_dilated" not in jaxpr) == (D.vector_bits() >= 512)


# The wide side: every compiled count; odd widths (partial register tiles); 1 -> F and F -> 1.
@pytest.mark.parametrize("cin, cout, hw", [(1, 8, (70, 70)), (8, 1, (70, 70)), (1, 16, (13, 17)),
                                           (16, 1, (17, 13)), (1, 32, (9, 11)), (32, 1, (11, 9)),
                                           (1, 64, (8, 10)), (64, 1, (10, 8))])
def test_thin_kernels_equal_xla_forward_and_gradients(cin, cout, hw):
  x = jax.random.normal(jax.random.key(8), (3, hw[0] + 6, hw[1] + 6, cin))
  w = 0.1 * jax.random.normal(jax.random.key(9), (7, 7, cin, cout))
  np.testing.assert_allclose(jax.jit(D.thin_conv)(x, w), _lax(1)(x, w), rtol=1e-4, atol=1e-4)
  (v1, (dx1, dw1)), (v2, (dx2, dw2)) = (_value_and_grads(_lax(1), x, w),
                                        _value_and_grads(D.thin_conv, x, w))
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in ((dx1, dx2), (dw1, dw2)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))


def test_conv_general_dilated_takes_the_thin_kernels_only_where_they_apply():
  x1, x8 = jnp.ones((2, 12, 12, 1)), jnp.ones((2, 12, 12, 8))
  conv = lambda x, w, **kw: R.conv_general_dilated(x, w, kw.pop("s", (1, 1)), "VALID",
                                                   dimension_numbers=_DIMS, **kw)
  thin = lambda fn, *a: _uses_kernel(fn, *a, target="agcg_thin")
  assert thin(conv, x1, jnp.ones((7, 7, 1, 8))) and thin(conv, x8, jnp.ones((7, 7, 8, 1)))
  assert not thin(conv, x1, jnp.ones((5, 5, 1, 8)))          # 5x5: the matmul rewrite
  assert not thin(conv, x1, jnp.ones((7, 7, 1, 4)))          # 4 outputs: not compiled in
  assert not thin(conv, jnp.ones((2, 12, 12, 2)), jnp.ones((7, 7, 2, 8)))  # not thin
  assert not thin(lambda x, w: conv(x, w, s=(2, 2)), x1, jnp.ones((7, 7, 1, 8)))
  assert not thin(conv, x1.astype(jnp.bfloat16), jnp.ones((7, 7, 1, 8), jnp.bfloat16))


def test_a_failed_build_falls_back_with_one_warning(caplog):
  def broken():
    raise RuntimeError("no C++ compiler 'c++-missing' on PATH (set CXX)")
  with caplog.at_level(logging.WARNING):
    assert D._load(broken) is False
  assert "c++-missing" in caplog.text
  assert "using XLA's convolutions and flax's instance norm" in caplog.text
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'c\\+\\+-missing'"):
    D.build(cxx="c++-missing")


def test_build_is_cached_per_source(tmp_path):
  lib = D.build()
  assert lib.exists() and D.build() == lib      # found, not rebuilt
  assert lib.name.startswith("cpu_kernels-") and lib.parent == D.cache_dir()


def test_old_builds_are_pruned_keeping_the_most_recently_used(tmp_path):
  import os
  for age, name in enumerate("abcdef"):  # a newest, f oldest
    lib = tmp_path / f"cpu_kernels-{name}.so"
    lib.write_bytes(b"")
    os.utime(lib, (1e9 - age, 1e9 - age))
  (tmp_path / "other.so").write_bytes(b"")  # not ours: left alone
  (tmp_path / "tmpold.so").write_bytes(b"")  # a build cut off an hour ago
  os.utime(tmp_path / "tmpold.so", (1e9, 1e9))
  (tmp_path / "tmpnow.so").write_bytes(b"")  # a build running now
  D._prune(tmp_path, keep=4)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "cpu_kernels-a.so", "cpu_kernels-b.so", "cpu_kernels-c.so", "cpu_kernels-d.so", "other.so",
      "tmpnow.so"]


def test_prebuild_hands_its_result_or_its_error_to_load(monkeypatch):
  lib = D.build()  # cached
  monkeypatch.setattr(D, "build", lambda: lib)
  job = D._Prebuild()
  job.start()
  assert job.result() == lib
  def broken():
    raise RuntimeError("no C++ compiler 'c++-missing' on PATH (set CXX)")
  monkeypatch.setattr(D, "build", broken)
  job = D._Prebuild()
  job.start()
  with pytest.raises(RuntimeError, match="c\\+\\+-missing"):
    job.result()


@pytest.mark.parametrize("c, hw", [(8, (9, 13)), (16, (16, 16)), (32, (5, 7)), (64, (4, 3)),
                                   (128, (5, 3)), (256, (3, 4)),
                                   (3, (6, 6))])  # 3 channels: not compiled in, the same formula
def test_instance_norm_equals_flax_forward_and_gradients(c, hw):
  x = 2.0 + 3.0 * jax.random.normal(jax.random.key(4), (3, *hw, c))  # an offset, as after a conv
  ref, ours = nn.InstanceNorm(epsilon=1e-5), InstanceNorm(epsilon=1e-5)
  params = {"params": {"scale": 1.0 + 0.5 * jax.random.normal(jax.random.key(5), (c,)),
                       "bias": jax.random.normal(jax.random.key(6), (c,))}}
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  assert _uses_kernel(lambda x: ours.apply(params, x), x, target="agcg_instance_norm") == (c != 3)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-4, atol=1e-4)
  weight = jax.random.normal(jax.random.key(7), x.shape)  # a loss whose gradient differs per pixel
  grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(weight * jnp.tanh(m.apply(p, x))),
                            argnums=(0, 1)))(params, x) for m in (ref, ours)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("shape, p", [((2, 9, 11, 8), 3), ((3, 5, 6, 16), 4), ((1, 4, 7, 3), 1)])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_pad_kernel_equals_jnp_pad_and_its_gradient(shape, p, mode):
  x = jax.random.normal(jax.random.key(10), shape)
  ref = lambda x: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)),
                          mode="reflect" if mode == "reflect" else "constant")
  ours = lambda x: D.pad(x, p, mode)
  assert D.pad_supported(shape, p, x.dtype)
  assert _uses_kernel(ours, x, target="agcg_pad")
  np.testing.assert_array_equal(jax.jit(ours)(x), ref(x))
  weight = jax.random.normal(jax.random.key(11), ref(x).shape)  # each padded pixel its own weight
  grads = [jax.jit(jax.grad(lambda x, f=f: jnp.sum(weight * f(x))))(x) for f in (ref, ours)]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_pad_kernel_only_where_it_applies():
  assert not D.pad_supported((2, 4, 9, 8), 4, jnp.float32)    # reflect needs p < H
  assert not D.pad_supported((2, 9, 9, 8), 0, jnp.float32)
  assert not D.pad_supported((2, 9, 9, 8), 1, jnp.bfloat16)
  assert not D.pad_supported((9, 9, 8), 1, jnp.float32)


def test_winograd_over_several_tile_chunks():
  # 6 x 64 tiles of 4x4 outputs, 256 -> 64 channels: more than one chunk of transformed tiles
  # (cpu_kernels.cc: 364 tiles at 256 + 64 channels, kWinogradFloats) in the forward and the input
  # gradient (6 x 81 tiles), and (at most 128, kWinogradGradTiles) in the kernel gradient, whose
  # chunks add to dw. F(4x4)'s rounding is ~5e-6 of the largest value (XLA's ~1e-6;
  # benchmarks/wide_convs.py), so the gradients get 3e-5 here: a wrong sign or a lost chunk is off
  # by O(1).
  x = jax.random.normal(jax.random.key(14), (6, 34, 34, 256))
  w = 0.05 * jax.random.normal(jax.random.key(15), (3, 3, 256, 64))
  conv = lambda x, w: D.conv3x3(x, w, 1)
  np.testing.assert_allclose(jax.jit(conv)(x, w), _lax(1)(x, w), rtol=1e-4, atol=1e-4)
  (_, (dx1, dw1)), (_, (dx2, dw2)) = _value_and_grads(_lax(1), x, w), _value_and_grads(conv, x, w)
  for a, b in ((dx1, dx2), (dw1, dw2)):
    assert float(jnp.max(jnp.abs(a - b))) <= 3e-5 * float(jnp.max(jnp.abs(a)))


def test_an_empty_batch_has_a_zero_kernel_gradient():
  # Winograd's kernel gradient keeps its buffers per thread: after a full call, what an empty one
  # left unwritten would still hold that call's sums (repeated: the calls may run on any thread).
  w = jnp.ones((3, 3, 128, 64))
  dw = jax.jit(lambda x: jax.grad(lambda w: jnp.sum(D.conv3x3(x, w, 1)))(w))
  assert float(jnp.abs(dw(jnp.ones((1, 10, 10, 128)))).min()) > 0
  for _ in range(4):
    assert float(jnp.abs(dw(jnp.ones((0, 10, 10, 128)))).max()) == 0.0


_AVX2_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from agcg_jax.models import cpu_kernels as D
    D.FLAGS = tuple({"-march=native": "-march=haswell", "-O3": "-O1"}.get(f, f) for f in D.FLAGS)
    assert D.vector_bits() == 256 and not D.supported((3, 3, 128, 64), jnp.float32)
    def lax_conv(d):
      return lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", rhs_dilation=(d, d),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    def grads(conv, x, w):
      return jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2), argnums=(0, 1))(x, w)
    # compiled (shared tile), the wide kernel gradient (direct, Winograd), thin 7x7 both ways
    for c, k, n, d in ((16, 32, 3, 2), (128, 64, 3, 2), (128, 64, 3, 1), (1, 16, 7, 1),
                       (16, 1, 7, 1)):
      x = jax.random.normal(jax.random.key(0), (2, 13, 11, c))
      w = 0.1 * jax.random.normal(jax.random.key(1), (n, n, c, k))
      ours = (lambda x, w: D.conv3x3(x, w, d)) if n == 3 else D.thin_conv
      for a, b in zip(grads(ours, x, w), grads(lax_conv(d), x, w)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))), (c, k, d)
    x = jax.random.normal(jax.random.key(2), (2, 5, 4, 64))
    y = D.instance_norm(x, jnp.ones(64), jnp.zeros(64))
    m, v = jnp.mean(x, (1, 2), keepdims=True), jnp.var(x, (1, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - m) / jnp.sqrt(v + 1e-5), atol=1e-5)
    print("avx2 ok")
""")


def _has_avx2() -> bool:
  try:
    flags = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")]
  except OSError:
    return False
  return bool(flags) and {"avx2", "fma"} <= set(flags[0].split())


# CI's machine has AVX-512; a laptop often has AVX2 only, where the kernels' 16-float vectors are
# register pairs (cpu_kernels.cc). Built for Haswell (-O1: the same code, half the build time) in a
# fresh process: every kind of kernel against XLA, and the wide convs left to XLA.
@pytest.mark.skipif(not _has_avx2(), reason="the CPU cannot run an AVX2 build")
def test_an_avx2_build_equals_xla(tmp_path):
  env = {**os.environ, "AGCG_KERNEL_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0 and "avx2 ok" in done.stdout, done.stderr[-2000:]


# Calls of 2^25 multiply-adds or more are split over XLA's thread pool (ParallelFor); the tests
# above stay below that. One of each kind above it, forward and both gradients.
@pytest.mark.parametrize("kind", ["conv3x3", "wide", "thin_in", "thin_out"])
def test_calls_split_over_threads_equal_xla(kind):
  if kind in ("conv3x3", "wide"):
    b, c = (4, 64) if kind == "conv3x3" else (1, 128)
    x = jax.random.normal(jax.random.key(12), (b, 34, 34, c))
    w = 0.05 * jax.random.normal(jax.random.key(13), (3, 3, c, c))  # 151M multiply-adds
    conv = lambda x, w: D.conv3x3(x, w, 1)
  else:
    c, f = (1, 64) if kind == "thin_in" else (64, 1)
    x = jax.random.normal(jax.random.key(12), (1, 118, 118, c))
    w = 0.05 * jax.random.normal(jax.random.key(13), (7, 7, c, f))  # 39M multiply-adds
    conv = D.thin_conv
  np.testing.assert_allclose(jax.jit(conv)(x, w), _lax(1)(x, w), rtol=1e-4, atol=1e-4)
  (_, (dx1, dw1)), (_, (dx2, dw2)) = _value_and_grads(_lax(1), x, w), _value_and_grads(conv, x, w)
  for a, b in ((dx1, dx2), (dw1, dw2)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
