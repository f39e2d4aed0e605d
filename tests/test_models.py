"""Shapes and value ranges of every network, with and without jit."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from agcg_jax import models as M
from agcg_jax.models import layers

KEY = jax.random.PRNGKey(0)


def _x(b=2, s=32, seed=1):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, s, s, 1), minval=-1.0, maxval=1.0)


class NetworkTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_generator(self):
    for up in ("subpixel", "transpose", "resize"):
      net = M.ResnetGenerator(width=4, num_down=2, num_res=2, upsample=up)
      x = _x()
      params = net.init(KEY, x)
      y = self.variant(net.apply)(params, x)
      chex.assert_shape(y, x.shape)
      chex.assert_tree_all_finite(y)
      assert float(jnp.max(jnp.abs(y))) <= 1.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention(self):
    net = M.AttentionNet(width=4, dilations=(1, 2, 4))
    x = _x()
    params = net.init(KEY, x)
    a = self.variant(net.apply)(params, x)
    chex.assert_shape(a, (2, 32, 32, 1))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # A sigmoid map, not a constant: it varies over the image.
    assert float(a.std()) > 0.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_discriminator(self):
    net = M.PatchDiscriminator(width=4, num_layers=3)
    x = _x(s=64)
    params = net.init(KEY, x)
    d = self.variant(net.apply)(params, x)
    # 64 -> 32 -> 16 -> 8 -> 7 (stride-1 k4) -> 6 (k4 output conv)
    chex.assert_shape(d, (2, 6, 6, 1))
    # Raw logits by default: not confined to (0, 1).
    net_sig = M.PatchDiscriminator(width=4, num_layers=3, sigmoid=True)
    s = self.variant(net_sig.apply)(params, x)
    np.testing.assert_allclose(s, jax.nn.sigmoid(d), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_classifier(self):
    net = M.Classifier(width=4, num_layers=3)
    x = _x(s=64)
    params = net.init(KEY, x)
    logits, inter = self.variant(lambda p, v: net.apply(p, v, mutable=["intermediates"]))(params, x)
    chex.assert_shape(logits, (2, 2))
    chex.assert_shape(inter["intermediates"]["features"][0], (2, 7, 7, 32))
    assert params["params"]["head"]["kernel"].shape == (32, 2)
    # Without the trunk's instance norms (model.cls_norm=none): no norm parameters, a bias on
    # every conv, the same features' shape, and other features than with the norms.
    plain = M.Classifier(width=4, num_layers=3, norm=False)
    p_plain = plain.init(KEY, x)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p_plain)[0]]
    assert not any("Norm" in k for k in paths), paths
    assert any("Norm" in jax.tree_util.keystr(k)
               for k, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    trunk = p_plain["params"]["PatchTrunk_0"]
    assert all("bias" in trunk[f"Conv_{i}"] for i in range(4)), paths
    _, inter_plain = self.variant(lambda p, v: plain.apply(p, v, mutable=["intermediates"]))(
        p_plain, x)
    chex.assert_shape(inter_plain["intermediates"]["features"][0], (2, 7, 7, 32))


def test_bf16_compute_keeps_fp32_params():
  net = M.ResnetGenerator(width=4, num_res=1, dtype=jnp.bfloat16)
  x = _x()
  params = net.init(KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  y = net.apply(params, x)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  y32 = M.ResnetGenerator(width=4, num_res=1).apply(params, x)
  np.testing.assert_allclose(y, y32, atol=0.1)


def test_depth_to_space_matches_manual_rearrangement():
  x = jnp.arange(2 * 3 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 3, 8)
  y = layers.depth_to_space(x, 2)
  chex.assert_shape(y, (2, 6, 6, 2))
  for i in range(3):
    for j in range(3):
      for di in range(2):
        for dj in range(2):
          np.testing.assert_array_equal(y[:, 2 * i + di, 2 * j + dj, :],
                                        x[:, i, j, (di * 2 + dj) * 2:(di * 2 + dj) * 2 + 2])


def test_subpixel_upsampling_can_express_a_transposed_conv():
  """Any 3x3 stride-2 'SAME' transposed conv is a subpixel conv with suitable weights."""
  cin, cout = 3, 2
  x = _x(b=1, s=6)[..., :1].repeat(cin, axis=-1)
  tconv = jax.random.normal(KEY, (3, 3, cin, cout))
  ref = jax.lax.conv_transpose(x, tconv, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Find the equivalent subpixel kernel by least squares on the linear map.
  up = layers.Upsample2x(cout, mode="subpixel", padding="zeros")
  params = up.init(KEY, x)

  def apply(k):
    p = {"params": {"PadConv_0": {"Conv_0": {"kernel": k}}}}
    return up.apply(p, x)
  k0 = params["params"]["PadConv_0"]["Conv_0"]["kernel"]
  # The map k -> apply(k) is linear: solve apply(k) = ref.
  basis = jnp.eye(k0.size).reshape(k0.size, *k0.shape)
  a = jax.vmap(apply)(basis).reshape(k0.size, -1).T
  sol, *_ = jnp.linalg.lstsq(a, ref.reshape(-1))
  np.testing.assert_allclose(a @ sol, ref.reshape(-1), atol=1e-4)
