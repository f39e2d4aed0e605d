"""Every loss against numbers worked out by hand, so a flipped sign or target fails.

The logits are deliberately not symmetric about 0 (a hinge with its sign
flipped would otherwise give the same mean), and some sit beyond the hinge
margins so the clamp at 0 is exercised.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agcg_jax import losses

# Four patch logits shaped like a discriminator's output [B, H', W', 1].
X = [-3.0, -0.5, 0.25, 2.0]
KINDS = ("hinge", "lsgan", "bce")


def _logits():
  return jnp.asarray(X, jnp.float32).reshape(1, 2, 2, 1)


def _close(got, want):
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-7)


def test_hinge_by_hand():
  """Paper Equ. 10: D_real = mean max(1 - x, 0), D_fake = mean max(1 + x, 0), G = -mean x."""
  x = _logits()
  # max(1 - x, 0) = 4, 1.5, 0.75, 0 (x = 2 is past the margin)
  _close(losses.d_loss_real(x, "hinge"), (4 + 1.5 + 0.75 + 0) / 4)  # 1.5625
  # max(1 + x, 0) = 0 (x = -3 is past the margin), 0.5, 1.25, 3
  _close(losses.d_loss_fake(x, "hinge"), (0 + 0.5 + 1.25 + 3) / 4)  # 1.1875
  # -mean(x) = -(-3 - 0.5 + 0.25 + 2) / 4
  _close(losses.g_loss(x, "hinge"), 1.25 / 4)  # 0.3125


def test_lsgan_by_hand():
  """Least squares: D pulls real to 1 and fake to 0; G pulls its fakes to 1."""
  x = _logits()
  # (x - 1)^2 = 16, 2.25, 0.5625, 1
  _close(losses.d_loss_real(x, "lsgan"), (16 + 2.25 + 0.5625 + 1) / 4)  # 4.953125
  # x^2 = 9, 0.25, 0.0625, 4
  _close(losses.d_loss_fake(x, "lsgan"), (9 + 0.25 + 0.0625 + 4) / 4)  # 3.328125
  _close(losses.g_loss(x, "lsgan"), (16 + 2.25 + 0.5625 + 1) / 4)  # 4.953125


def test_bce_by_hand():
  """Binary cross-entropy on raw logits: -log sigmoid(x) for label 1, -log(1 - sigmoid(x)) for 0.

  -log sigmoid(x) = log(1 + exp(-x)); -log(1 - sigmoid(x)) = log(1 + exp(x)).
  G uses the non-saturating form (label 1 on its fakes).
  """
  x = _logits()
  real = sum(math.log(1 + math.exp(-v)) for v in X) / 4  # ~1.2277
  fake = sum(math.log(1 + math.exp(v)) for v in X) / 4   # ~0.9152
  _close(losses.d_loss_real(x, "bce"), real)
  _close(losses.d_loss_fake(x, "bce"), fake)
  _close(losses.g_loss(x, "bce"), real)
  assert abs(real - fake) > 0.3  # the two labels are told apart on X


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_gradient_directions(kind):
  """For logits in (0, 1) (inside every margin), raising a logit lowers D's
  real loss and G's loss and raises D's fake loss, for every kind."""
  x = jnp.asarray([0.1, 0.4, 0.7, 0.9], jnp.float32).reshape(1, 2, 2, 1)
  for fn, sign in ((losses.d_loss_real, -1), (losses.g_loss, -1), (losses.d_loss_fake, +1)):
    g = np.asarray(jax.grad(lambda v: fn(v, kind))(x))
    assert np.all(sign * g > 0), (fn.__name__, kind, g.ravel())


def test_cycle_loss_by_hand():
  """MSE (paper) and L1 of reconstruction minus original, over all pixels."""
  rec = jnp.asarray([[0.5, -1.0], [2.0, 0.0]], jnp.float32)[None, ..., None]
  orig = jnp.asarray([[0.0, 0.0], [1.0, 1.0]], jnp.float32)[None, ..., None]
  # diff = 0.5, -1, 1, -1
  _close(losses.cycle_loss(rec, orig, "mse"), (0.25 + 1 + 1 + 1) / 4)  # 0.8125
  _close(losses.cycle_loss(rec, orig, "l1"), (0.5 + 1 + 1 + 1) / 4)     # 0.875
  _close(losses.cycle_loss(orig, orig, "mse"), 0.0)
  # bf16 inputs are compared in fp32.
  assert losses.cycle_loss(rec.astype(jnp.bfloat16), orig, "l1").dtype == jnp.float32


def test_cross_entropy_by_hand():
  """Softmax cross-entropy: mean of -log p(label); class weights give a weighted mean."""
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], jnp.float32)
  labels = jnp.asarray([0, 0, 1], jnp.int32)
  # -log softmax(logits)[label] = log(sum exp(logits)) - logits[label]
  p0 = math.log(1 + math.exp(-2))  # row [2, 0], label 0: ~0.1269
  p1 = math.log(1 + math.exp(1))   # row [0, 1], label 0: ~1.3133
  p2 = math.log(2)                 # row [1, 1], label 1: ~0.6931
  _close(losses.cross_entropy(logits, labels), (p0 + p1 + p2) / 3)  # ~0.7111
  # Weights [1, 3]: per-example weights 1, 1, 3, normalised by their sum (5).
  w = jnp.asarray([1.0, 3.0], jnp.float32)
  _close(losses.cross_entropy(logits, labels, w), (p0 + p1 + 3 * p2) / 5)  # ~0.7011
  # Equal weights (of any size) are the unweighted mean.
  _close(losses.cross_entropy(logits, labels, jnp.asarray([2.0, 2.0])), (p0 + p1 + p2) / 3)
  # The loss is of the labelled class, not the other one.
  wrong = jnp.asarray([1, 1, 0], jnp.int32)
  assert float(losses.cross_entropy(logits, wrong)) > float(losses.cross_entropy(logits, labels)) + 0.3


def test_unknown_kinds_raise():
  x = _logits()
  for fn in (losses.d_loss_real, losses.d_loss_fake, losses.g_loss):
    with pytest.raises(ValueError, match="unknown adversarial loss 'wgan'"):
      fn(x, "wgan")
  with pytest.raises(ValueError, match="unknown cycle loss 'l2'"):
    losses.cycle_loss(x, x, "l2")


def test_attention_amount_draws_each_image_to_its_target():
  # Two 2x2 maps: means 0.1 and 0.6.
  att = jnp.asarray([[[0.0, 0.2], [0.2, 0.0]], [[0.6, 0.6], [0.6, 0.6]]])[..., None]
  np.testing.assert_allclose(losses.attention_amount(att), 0.35, rtol=1e-6)  # plain L1: the mean
  np.testing.assert_allclose(losses.attention_amount(att, 0.3), (0.2 + 0.3) / 2, rtol=1e-6)
  g = jax.grad(losses.attention_amount)(att, 0.3)
  # Below the target the prior pulls the map up, above it down; every pixel of an image alike.
  np.testing.assert_allclose(g[0], -0.5 / 4, rtol=1e-6)
  np.testing.assert_allclose(g[1], 0.5 / 4, rtol=1e-6)
  assert float(jnp.min(jax.grad(losses.attention_amount)(att))) > 0  # target 0: always down
