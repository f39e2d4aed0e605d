"""Class activation maps (paper Equ. 9), computed functionally from intermediates.

Two maps of one forward pass:

* `equ9`: the CAM of the predicted class, M_c = sum_k w^c_k f_k (the paper's
  Equ. 9, literal).
* `margin` (the headline): M_pred - M_other = (w_pred - w_other) . f, the
  map whose spatial mean plus the bias gap b_pred - b_other is the logit
  margin, i.e. the decision itself.

Why the margin map: with a two-class softmax head trained by cross-entropy,
the gradients of w_NF and w_CM are exactly opposite, so w_NF + w_CM never
leaves its random initial value. Equ. 9's map is
1/2 (w_NF + w_CM) . f  +-  1/2 (w_CM - w_NF) . f: an untrained random
projection of the features plus (or minus) half the decision. Softmax ignores
the common part; the margin map does too, so it shows only what decides.

Maps live on the feature grid; `upsample` puts each cell at the centre of its
receptive field (`models.discriminator.trunk_geometry`), not where a plain
image resize would put it.
"""
import jax
import jax.numpy as jnp

CAM_KINDS = ("margin", "equ9")


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


def decision_maps(cams: jnp.ndarray, pred: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """The two-class maps of the predicted class: {'margin', 'equ9'}, each [B, H', W'].

  cams [B, H', W', 2] from `logits_and_cam`; pred int [B].
  """
  if cams.shape[-1] != 2:
    raise ValueError(f"decision maps need a two-class head, got {cams.shape[-1]} classes")
  onehot = jax.nn.one_hot(pred, 2, dtype=cams.dtype)[:, None, None, :]
  equ9 = jnp.sum(cams * onehot, axis=-1)
  other = jnp.sum(cams * (1.0 - onehot), axis=-1)
  return {"margin": equ9 - other, "equ9": equ9}


def interpolation_matrix(cells: int, size: int, stride: float, offset: float) -> jnp.ndarray:
  """[size, cells]: linear interpolation from cell centres offset + stride * i to pixels 0..size-1.

  Beyond the first and last cell centres the edge value is held (no
  extrapolation). Rows sum to 1.
  """
  pos = (jnp.arange(size, dtype=jnp.float32) - offset) / stride
  pos = jnp.clip(pos, 0.0, cells - 1.0)
  lo = jnp.clip(jnp.floor(pos), 0, max(cells - 2, 0)).astype(jnp.int32)
  frac = pos - lo
  rows = jnp.arange(size)
  m = jnp.zeros((size, cells), jnp.float32)
  m = m.at[rows, lo].add(1.0 - frac)
  if cells > 1:
    m = m.at[rows, lo + 1].add(frac)
  return m


def upsample(maps: jnp.ndarray, size: int, stride: float, offset: float) -> jnp.ndarray:
  """[B, h, w] on the feature grid -> [B, size, size], each cell at its receptive field's centre."""
  _, h, w = maps.shape
  rows = interpolation_matrix(h, size, stride, offset)
  cols = interpolation_matrix(w, size, stride, offset)
  return jnp.einsum("yh,bhw,xw->byx", rows, maps.astype(jnp.float32), cols)
