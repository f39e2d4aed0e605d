"""Pure jnp losses (paper Sec. 4.4 and the options DESIGN.md lists)."""
import jax.numpy as jnp
import optax


def d_loss_real(logits: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Discriminator loss on real images. `logits` [B, H', W', 1] raw (or sigmoid)."""
  if kind == "hinge":  # Equ. 10: -min(x - 1, 0)
    return jnp.mean(jnp.maximum(1.0 - logits, 0.0))
  if kind == "lsgan":
    return jnp.mean((logits - 1.0) ** 2)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)))
  raise ValueError(f"unknown adversarial loss {kind!r}")


def d_loss_fake(logits: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Discriminator loss on translated images."""
  if kind == "hinge":  # Equ. 10: -min(-x - 1, 0)
    return jnp.mean(jnp.maximum(1.0 + logits, 0.0))
  if kind == "lsgan":
    return jnp.mean(logits ** 2)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.zeros_like(logits)))
  raise ValueError(f"unknown adversarial loss {kind!r}")


def g_loss(logits: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Generator (and attention) adversarial loss on its translations."""
  if kind == "hinge":  # Equ. 10: -x
    return -jnp.mean(logits)
  if kind == "lsgan":
    return jnp.mean((logits - 1.0) ** 2)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)))
  raise ValueError(f"unknown adversarial loss {kind!r}")


def cycle_loss(reconstructed: jnp.ndarray, original: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Cycle-consistency loss: MSE (paper) or L1 (original AG-CycleGAN code)."""
  diff = reconstructed.astype(jnp.float32) - original.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(diff ** 2)
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  raise ValueError(f"unknown cycle loss {kind!r}")


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                  class_weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean softmax cross-entropy, optionally class-weighted. logits [B, K], labels [B]."""
  per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if class_weights is None:
    return jnp.mean(per)
  w = class_weights[labels]
  return jnp.sum(w * per) / jnp.sum(w)


def attention_amount(attention: jnp.ndarray, target: float = 0.0) -> jnp.ndarray:
  """The attention map's L1 prior: its mean, or each image's distance from a target amount.

  target 0 (GANimation's sparsity prior): mean(A), pushing every map towards
  nothing, so an image whose translation has little support under the
  adversarial loss may end up with no attention, and no change, at all.
  target t > 0: mean over images of |mean_hw(A) - t|: each image's map is
  drawn towards the same amount t (a fraction of the image), pushed down
  above it as before and up below it; where it goes stays the other losses'.
  """
  if target <= 0.0:
    return jnp.mean(attention)
  per_image = jnp.mean(attention.astype(jnp.float32), axis=tuple(range(1, attention.ndim)))
  return jnp.mean(jnp.abs(per_image - target))
