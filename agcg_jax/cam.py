"""Class activation maps (paper Equ. 9), computed functionally from intermediates."""
import jax
import jax.numpy as jnp


def logits_and_cam(model, params, images):
  """Logits [B, K] and CAM [B, H', W', K] of every class, from one forward pass.

  M_c(x, y) = sum_k w^c_k f_k(x, y) over the feature map f that the global
  average pooling sees (sown as intermediates['features']). Hence
  mean_{x,y} M_c + b_c == logit_c exactly (tested).
  """
  logits, inter = model.apply({"params": params}, images, mutable=["intermediates"])
  features = inter["intermediates"]["features"][0]
  kernel = params["head"]["kernel"]
  cams = jnp.einsum("bhwk,kc->bhwc", features, kernel)
  return logits, cams


def upsample(maps: jnp.ndarray, size: int) -> jnp.ndarray:
  """[B, h, w, K] -> [B, size, size, K], bilinear (CAM is coarse; this is only for display and overlap scores)."""
  b, _, _, k = maps.shape
  return jax.image.resize(maps, (b, size, size, k), method="bilinear")


def normalize01(maps: jnp.ndarray) -> jnp.ndarray:
  """Per-image, per-channel min-max scaling to [0, 1] (constant maps -> 0)."""
  lo = jnp.min(maps, axis=(1, 2), keepdims=True)
  hi = jnp.max(maps, axis=(1, 2), keepdims=True)
  return (maps - lo) / jnp.maximum(hi - lo, 1e-12)
