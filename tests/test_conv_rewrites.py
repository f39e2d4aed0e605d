"""The exact conv rewrites (models/conv_rewrites.py) give XLA's sums and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from agcg_jax import models as M
from agcg_jax.errors import UserError
from agcg_jax.models import conv_rewrites as R
from agcg_jax.models.layers import pad


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape)


def _value_and_grads(conv, x, w):
  # A non-linear loss so every output pixel's gradient differs.
  return jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2), argnums=(0, 1))(x, w)


def _close(a, b, rtol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(u))) + 1e-6
    assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale


@pytest.mark.parametrize("shape, cin, cout", [
    ((2, 20, 20), 1, 8),   # 14 output columns: not whole blocks of 8
    ((2, 22, 18), 1, 3),
    ((2, 20, 20), 8, 1),
    ((1, 17, 23), 5, 1),
])
def test_thin_convs_equal_xla_forward_and_gradients(shape, cin, cout):
  x = _rand(0, (*shape, cin))
  w = _rand(1, (7, 7, cin, cout), 0.1)
  rewrite = R.one_in if cin == 1 else R.one_out
  np.testing.assert_allclose(rewrite(x, w), R.lax_conv(x, w), rtol=1e-5, atol=1e-5)
  _close(_value_and_grads(R.lax_conv, x, w), _value_and_grads(rewrite, x, w))


def test_conv_general_dilated_rewrites_only_thin_stride1_convs():
  assert R.applies((2, 20, 20, 1), (7, 7, 1, 8))
  assert R.applies((2, 20, 20, 8), (7, 7, 8, 1), padding=((0, 0), (0, 0)))
  assert not R.applies((2, 20, 20, 8), (7, 7, 8, 4))               # neither side thin
  assert not R.applies((2, 20, 20, 1), (3, 3, 1, 8))               # small kernel
  assert not R.applies((2, 20, 20, 1), (7, 7, 1, 8), window_strides=(2, 2))
  assert not R.applies((2, 20, 20, 1), (7, 7, 1, 8), rhs_dilation=(2, 2))
  assert not R.applies((2, 20, 20, 1), (7, 7, 1, 8), padding="SAME")
  assert not R.applies((2, 1, 20, 20), (7, 7, 1, 8), dimension_numbers=("NCHW", "HWIO", "NHWC"))
  # Everything else goes to lax unchanged, e.g. a strided, padded 3x3 conv.
  x, w = _rand(2, (2, 12, 12, 4)), _rand(3, (3, 3, 4, 6))
  dims = ("NHWC", "HWIO", "NHWC")
  np.testing.assert_array_equal(
      R.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims),
      lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dims))


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_upsample2x_conv_equals_resize_then_conv(padding):
  x = _rand(4, (2, 6, 5, 3))
  w = _rand(5, (3, 3, 3, 4), 0.3)

  def literal(x, w):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return R.lax_conv(pad(up, 1, padding), w)

  got = R.upsample2x_conv(x, w, padding)
  assert got.shape == (2, 12, 10, 4)
  np.testing.assert_allclose(got, literal(x, w), rtol=1e-5, atol=1e-5)
  _close(_value_and_grads(literal, x, w),
         _value_and_grads(lambda x, w: R.upsample2x_conv(x, w, padding), x, w))


@pytest.mark.parametrize("make", [
    lambda rewrite: M.AttentionNet(width=4, dilations=(1, 2), rewrite=rewrite),
    lambda rewrite: M.AttentionNet(width=8, dilations=(1, 2), rewrite=rewrite),  # direct kernel
    lambda rewrite: M.ResnetGenerator(width=4, num_res=1, rewrite=rewrite),
    lambda rewrite: M.ResnetGenerator(width=8, num_res=1, rewrite=rewrite),  # thin, stride-2 kernels
    # 64 -> 128 stride 2, 128-channel residual block and norms, sub-pixel 128 -> 256 and 64 -> 128:
    # the wide kernel (direct and Winograd)
    lambda rewrite: M.ResnetGenerator(width=32, num_res=1, rewrite=rewrite),
])
def test_networks_with_rewrites_are_the_same_function_of_the_same_parameters(make):
  x = jax.random.uniform(jax.random.key(6), (2, 16, 16, 1), minval=-1.0, maxval=1.0)
  plain, fast = make(False), make(True)
  params = plain.init(jax.random.key(7), x)
  assert (jax.tree.map(jnp.shape, fast.init(jax.random.key(7), x))
          == jax.tree.map(jnp.shape, params))  # checkpoints load either way
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), atol=1e-5)  # norms: two-pass variance
  grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply(p, x) ** 2))(params) for m in (plain, fast)]
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0]))
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
    # Parameters whose gradient is zero by construction (the bias of an instance norm
    # that another norm follows) differ only by rounding: scale by the largest gradient.
    scale = max(float(jnp.max(jnp.abs(g))), 0.01 * largest)
    assert float(jnp.max(jnp.abs(g - h))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_resolve_setting():
  assert R.resolve("on") is True and R.resolve("off") is False
  assert R.resolve("auto") is (jax.default_backend() == "cpu")
  with pytest.raises(UserError, match="model.conv_rewrites"):
    R.resolve("fast")
