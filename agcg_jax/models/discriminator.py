"""The PatchGAN discriminator D_t (70x70 receptive field with 3 stride-2 layers)."""
import flax.linen as nn
import jax.numpy as jnp

from agcg_jax.models.layers import Dtype, instance_norm


def trunk_geometry(num_layers: int) -> tuple[float, float]:
  """(stride, offset) of PatchTrunk's output grid in input pixels.

  Cell i of the feature map has its receptive field centred on input pixel
  coordinate `offset + stride * i` (pixel j's centre at j). Composed from the
  trunk's layers: a k x k conv with stride s and padding p maps output index
  i to input centre s * i + (k - 1) / 2 - p.
  """
  layers = [(4, 2, 1)] * num_layers + [(4, 1, 1)]
  stride, offset = 1.0, 0.0
  for k, s, p in layers:  # input -> output: compose centre maps
    offset += stride * ((k - 1) / 2 - p)
    stride *= s
  return stride, offset


class PatchTrunk(nn.Module):
  """C64 (no norm) - C128 - C256 - ... stride 2, then one stride-1 C(8w); LeakyReLU 0.2.

  [B, H, W, C] -> [B, H', W', w * 2**num_layers]. Shared by the
  discriminator and the classifier (paper Sec. 4.3: same feature extractor).
  `norm=False` leaves out the instance norms (the classifier's
  `model.cls_norm=none`; a conv bias takes their place).
  """
  width: int = 64
  num_layers: int = 3
  dtype: Dtype = jnp.float32
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    h = x.astype(self.dtype)
    ch = self.width
    for i in range(self.num_layers + 1):
      stride = 2 if i < self.num_layers else 1
      h = nn.Conv(ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  use_bias=(i == 0 or not self.norm), dtype=self.dtype)(h)
      if i > 0 and self.norm:
        h = instance_norm(self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
      ch = min(2 * ch, 8 * self.width)
    return h


class PatchDiscriminator(nn.Module):
  """PatchGAN: [B, H, W, C] in [-1, 1] -> [B, H', W', 1] per-patch realness.

  Raw logits by default: the hinge loss (paper Equ. 10) is degenerate on a
  sigmoid output (its margins +-1 are never both crossed), so the sigmoid the
  paper mentions is an option (`sigmoid=True`) rather than the default.
  """
  width: int = 64
  num_layers: int = 3
  sigmoid: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = PatchTrunk(self.width, self.num_layers, self.dtype)(x)
    h = nn.Conv(1, (4, 4), padding=((1, 1), (1, 1)), dtype=self.dtype)(h)
    h = h.astype(jnp.float32)
    return nn.sigmoid(h) if self.sigmoid else h
