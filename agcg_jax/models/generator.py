"""The ResNet generator (CycleGAN's c7s1-64, d128, d256, 9 x R256, u128, u64, c7s1-1)."""
import flax.linen as nn
import jax.numpy as jnp

from agcg_jax.models.layers import Dtype, PadConv, ResBlock, Upsample2x, instance_norm


class ResnetGenerator(nn.Module):
  """Image-to-image generator G_t translating into domain t.

  Input [B, H, W, C] in [-1, 1] (H, W divisible by 2**num_down); output the
  same shape in [-1, 1] (tanh). Widths double at each of `num_down` stride-2
  convs, `num_res` residual blocks at the bottom, then `num_down` learned
  2x upsamplings back (DESIGN.md resolves the paper's "three times"/"twice").
  """
  width: int = 64
  num_down: int = 2
  num_res: int = 9
  upsample: str = "subpixel"
  padding: str = "reflect"
  dtype: Dtype = jnp.float32
  rewrite: bool = False  # exact, faster convs on XLA:CPU (models/conv_rewrites.py)

  @nn.compact
  def __call__(self, x):
    out_ch = x.shape[-1]
    x = x.astype(self.dtype)
    h = PadConv(self.width, 7, padding=self.padding, use_bias=False, dtype=self.dtype,
                rewrite=self.rewrite)(x)
    h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    ch = self.width
    for _ in range(self.num_down):
      ch *= 2
      h = PadConv(ch, 3, stride=2, padding="zeros", use_bias=False, dtype=self.dtype,
                  rewrite=self.rewrite)(h)
      h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    for _ in range(self.num_res):
      h = ResBlock(ch, padding=self.padding, dtype=self.dtype, rewrite=self.rewrite)(h)
    for _ in range(self.num_down):
      ch //= 2
      h = Upsample2x(ch, mode=self.upsample, padding=self.padding, dtype=self.dtype,
                     rewrite=self.rewrite)(h)
      h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    h = PadConv(out_ch, 7, padding=self.padding, dtype=self.dtype, rewrite=self.rewrite)(h)
    return jnp.tanh(h.astype(jnp.float32))
