"""The classifier: PatchGAN trunk + global average pooling + dense(2)."""
import flax.linen as nn
import jax.numpy as jnp

from agcg_jax.models.discriminator import PatchTrunk
from agcg_jax.models.layers import Dtype


class Classifier(nn.Module):
  """[B, H, W, C] in [-1, 1] -> logits [B, num_classes].

  The feature map that the global average pooling sees is sown as
  intermediates['features'] ([B, H', W', K], float32), so CAM (paper Equ. 9)
  can be computed from exactly the tensor the logits come from; see cam.py.
  The dense layer is named 'head' (kernel [K, num_classes], bias [num_classes]).
  """
  width: int = 64
  num_layers: int = 3
  num_classes: int = 2
  dtype: Dtype = jnp.float32
  norm: bool = True  # the trunk's instance norms

  @nn.compact
  def __call__(self, x):
    f = PatchTrunk(self.width, self.num_layers, self.dtype, self.norm)(x).astype(jnp.float32)
    self.sow("intermediates", "features", f)
    pooled = jnp.mean(f, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(pooled)
