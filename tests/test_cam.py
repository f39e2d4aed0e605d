"""The decision map (margin CAM), Equ. 9 literal, and CAM placed on its receptive-field grid."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agcg_jax import cam as cam_lib
from agcg_jax import state as S
from agcg_jax.models.discriminator import PatchTrunk, trunk_geometry


def _classifier(tiny_config, seed=3):
  model = S.classifier_model(tiny_config)
  s = tiny_config.data.image_size
  x = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (3, s, s, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  params["head"]["bias"] = jnp.array([0.3, -0.7])
  return model, params, x


def test_margin_map_mean_plus_bias_gap_is_the_logit_margin(tiny_config):
  model, params, x = _classifier(tiny_config)
  logits, cams = jax.jit(functools.partial(cam_lib.logits_and_cam, model))(params, x)
  pred = jnp.argmax(logits, -1)
  margin = cam_lib.decision_maps(cams, pred)["margin"]
  bias = params["head"]["bias"]
  gap = bias[pred] - bias[1 - pred]
  want = jnp.take_along_axis(logits, pred[:, None], 1)[:, 0] - jnp.take_along_axis(
      logits, (1 - pred)[:, None], 1)[:, 0]
  np.testing.assert_allclose(jnp.mean(margin, axis=(1, 2)) + gap, want, rtol=1e-5, atol=1e-5)
  # Equ. 9 literal: the predicted class's own map; mean + its bias = its logit.
  equ9 = cam_lib.decision_maps(cams, pred)["equ9"]
  np.testing.assert_allclose(jnp.mean(equ9, axis=(1, 2)) + bias[pred],
                             jnp.take_along_axis(logits, pred[:, None], 1)[:, 0], rtol=1e-5, atol=1e-5)


def test_margin_map_ignores_the_heads_common_mode_and_equ9_does_not(tiny_config):
  """Adding one vector to both class weights changes no softmax output: the
  decision map must not change either; Equ. 9's map does (that is its flaw)."""
  model, params, x = _classifier(tiny_config)
  k = params["head"]["kernel"]
  common = jnp.asarray(np.random.default_rng(1).normal(size=(k.shape[0], 1)), jnp.float32)
  shifted = jax.tree.map(lambda p: p, params)
  shifted["head"]["kernel"] = k + common  # same column added to both classes

  def maps(p):
    logits, cams = cam_lib.logits_and_cam(model, p, x)
    return jax.nn.softmax(logits), cam_lib.decision_maps(cams, jnp.argmax(logits, -1))
  (p0, m0), (p1, m1) = maps(params), maps(shifted)
  np.testing.assert_allclose(p0, p1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m0["margin"], m1["margin"], rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(m0["equ9"] - m1["equ9"]))) > 1e-2


def test_decision_maps_need_two_classes():
  with pytest.raises(ValueError, match="two-class"):
    cam_lib.decision_maps(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("num_layers,size", [(2, 32), (3, 64)])
def test_trunk_geometry_is_the_receptive_field_centre(num_layers, size):
  """The centre of the input region each feature cell depends on (its
  gradient support) is offset + stride * i, as trunk_geometry says."""
  trunk = PatchTrunk(width=2, num_layers=num_layers)
  x = jnp.zeros((1, size, size, 1)) + 0.1
  params = trunk.init(jax.random.PRNGKey(0), x)
  f = trunk.apply(params, x)
  stride, offset = trunk_geometry(num_layers)
  assert f.shape[1] == size // stride - 1
  for i in (0, f.shape[1] // 2, f.shape[1] - 1):
    g = jax.grad(lambda v: jnp.sum(trunk.apply(params, v)[0, i, i]))(
        jnp.asarray(np.random.default_rng(i).uniform(-1, 1, x.shape), jnp.float32))
    rows = np.flatnonzero(np.abs(np.asarray(g[0, :, :, 0])).sum(1) > 0)
    # The receptive field can be cut by the image edge: compare only when it is whole.
    lo, hi = rows[0], rows[-1]
    if lo > 0 and hi < size - 1:
      assert (lo + hi) / 2 == pytest.approx(offset + stride * i)


def test_upsample_puts_each_cell_at_its_centre():
  stride, offset = 8.0, 7.5
  cells = 7
  ramp = jnp.arange(cells, dtype=jnp.float32)
  maps = jnp.broadcast_to(ramp[None, None, :], (1, cells, cells))
  up = np.asarray(cam_lib.upsample(maps, 64, stride, offset))[0]
  # Pixel 7.5 + 8 i is cell i: between pixel centres 7 and 8 the value passes i
  # (inner cells; the outer ones are held flat beyond their centres).
  for i in range(1, cells - 1):
    centre = offset + stride * i
    lo, hi = int(np.floor(centre)), int(np.ceil(centre))
    assert (up[0, lo] + up[0, hi]) / 2 == pytest.approx(float(i))
  # Linear between centres, held constant beyond the outer ones.
  assert up[0, 15] == pytest.approx((15 - offset) / stride)
  assert up[0, 0] == pytest.approx(0.0) and up[0, 63] == pytest.approx(cells - 1.0)
  # A plain image resize would not put them there (the reason for this function).
  plain = np.asarray(jax.image.resize(maps, (1, 64, 64), "bilinear"))[0]
  assert abs(plain[0, 7] - up[0, 7]) > 0.1


def test_interpolation_rows_sum_to_one():
  m = np.asarray(cam_lib.interpolation_matrix(5, 40, 8.0, 3.5))
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
