"""The dilated-residual attention net A_t (paper Sec. 4.3)."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from agcg_jax.models.layers import Dtype, PadConv, ResBlock, Upsample2x, instance_norm


class AttentionNet(nn.Module):
  """Attention map of where to translate: [B, H, W, C] -> [B, H, W, 1] in [0, 1].

  c7s1-w, one stride-2 conv to 2w (the only downsampling, to keep spatial
  detail), dilated residual blocks (DRN) with `dilations`, nearest upsample +
  conv3 back to w (instead of a transposed conv), c7s1-1, sigmoid.
  """
  width: int = 32
  dilations: Sequence[int] = (1, 2, 4, 1)
  padding: str = "reflect"
  dtype: Dtype = jnp.float32
  rewrite: bool = False  # exact, faster convs on XLA:CPU (models/conv_rewrites.py)

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    h = PadConv(self.width, 7, padding=self.padding, use_bias=False, dtype=self.dtype,
                rewrite=self.rewrite)(x)
    h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    h = PadConv(2 * self.width, 3, stride=2, padding="zeros", use_bias=False, dtype=self.dtype,
                rewrite=self.rewrite)(h)
    h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    for d in self.dilations:
      h = ResBlock(2 * self.width, dilation=d, padding=self.padding, dtype=self.dtype,
                   rewrite=self.rewrite)(h)
    h = Upsample2x(self.width, mode="resize", padding=self.padding, dtype=self.dtype,
                   rewrite=self.rewrite)(h)
    h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    h = PadConv(1, 7, padding=self.padding, dtype=self.dtype, rewrite=self.rewrite)(h)
    return nn.sigmoid(h.astype(jnp.float32))
