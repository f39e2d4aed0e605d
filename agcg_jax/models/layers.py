"""Shared building blocks: padded convs, instance norm, residual blocks, upsampling.

All modules take NHWC inputs. `dtype` is the compute dtype (float32 or
bfloat16); parameters are always float32 (mixed precision keeps master
weights and Adam moments in full precision).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import agcg_jax.models.cpu_kernels as cpu_kernels
from agcg_jax.models.conv_rewrites import conv_general_dilated as rewritten_conv
from agcg_jax.models.conv_rewrites import upsample2x_conv

Dtype = Any


def pad(x: jnp.ndarray, p: int, mode: str, rewrite: bool = False) -> jnp.ndarray:
  """Pads H and W of [B, H, W, C] by p on each side ('reflect' or 'zeros'); `rewrite`: on the CPU
  pad kernel where it applies (the same values)."""
  if p == 0:
    return x
  if rewrite and cpu_kernels.pad_supported(x.shape, p, x.dtype):
    return cpu_kernels.pad(x, p, mode)
  widths = ((0, 0), (p, p), (p, p), (0, 0))
  return jnp.pad(x, widths, mode="reflect" if mode == "reflect" else "constant")


class PadConv(nn.Module):
  """Conv with explicit (reflect by default) 'same' padding, as CycleGAN uses."""
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  padding: str = "reflect"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  upsample: bool = False  # nearest 2x upsampling of the input first (3x3, stride 1 only)
  rewrite: bool = False   # exact, faster formulations on XLA:CPU (models/conv_rewrites.py)

  @nn.compact
  def __call__(self, x):
    if self.upsample:
      if (self.kernel, self.stride, self.dilation) != (3, 1, 1):
        raise ValueError("PadConv(upsample=True) needs a 3x3 kernel, stride 1, dilation 1")
      if self.rewrite:  # the whole layer as a sub-pixel conv at the input's resolution
        upsample_conv = lambda lhs, rhs, *_, **__: upsample2x_conv(lhs, rhs, self.padding)
        return nn.Conv(self.features, (3, 3), padding="VALID", use_bias=self.use_bias,
                       dtype=self.dtype, conv_general_dilated=upsample_conv)(x)
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    p = self.dilation * (self.kernel - 1) // 2
    x = pad(x, p, self.padding, self.rewrite)
    conv_fn = rewritten_conv if self.rewrite else None
    return nn.Conv(self.features, (self.kernel, self.kernel),
                   strides=(self.stride, self.stride),
                   kernel_dilation=(self.dilation, self.dilation),
                   padding="VALID", use_bias=self.use_bias, dtype=self.dtype,
                   conv_general_dilated=conv_fn)(x)


def instance_norm(dtype: Dtype, name: str | None = None, rewrite: bool = False) -> nn.Module:
  # A conv followed by instance norm carries no bias: the norm subtracts it
  # again, so its gradient is zero up to rounding, which Adam would amplify
  # into noise of the size of the learning rate.
  # Statistics are computed in float32 by flax even for bfloat16 inputs.
  if rewrite and cpu_kernels.available():
    return InstanceNorm(epsilon=1e-5, dtype=dtype, name=name)
  return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, name=name)


class InstanceNorm(nn.Module):
  """flax's nn.InstanceNorm (same name, same parameters: checkpoints load either way) on the CPU
  kernel (models/cpu_kernels.py) where it applies, else flax's formula in float32."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if cpu_kernels.norm_supported(x.shape, x.dtype):
      return cpu_kernels.instance_norm(x, scale, bias, self.epsilon).astype(self.dtype)
    x = x.astype(jnp.float32)  # flax's formula: one pass for both moments
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True) - jnp.square(mean), 0.0)
    return ((x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(self.dtype)


class ResBlock(nn.Module):
  """x + IN(conv3(ReLU(IN(conv3(x))))), optionally dilated (DRN)."""
  features: int
  dilation: int = 1
  padding: str = "reflect"
  dtype: Dtype = jnp.float32
  rewrite: bool = False  # convs and norms on the CPU kernels where they apply

  @nn.compact
  def __call__(self, x):
    h = PadConv(self.features, 3, dilation=self.dilation, padding=self.padding,
                use_bias=False, dtype=self.dtype, rewrite=self.rewrite)(x)
    h = nn.relu(instance_norm(self.dtype, rewrite=self.rewrite)(h))
    h = PadConv(self.features, 3, dilation=self.dilation, padding=self.padding,
                use_bias=False, dtype=self.dtype, rewrite=self.rewrite)(h)
    h = instance_norm(self.dtype, rewrite=self.rewrite)(h)
    return x + h


def depth_to_space(x: jnp.ndarray, r: int) -> jnp.ndarray:
  """[B, H, W, r*r*C] -> [B, r*H, r*W, C] (pixel shuffle)."""
  b, h, w, c = x.shape
  c_out = c // (r * r)
  x = x.reshape(b, h, w, r, r, c_out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * r, w * r, c_out)


class Upsample2x(nn.Module):
  """Learned 2x upsampling, the generator's 'u' layer.

  mode='transpose': a 3x3 stride-2 transposed conv (CycleGAN's layer).
  mode='subpixel': a 3x3 stride-1 conv to 4x the channels, then pixel
    shuffle. Each output phase of a 3x3 stride-2 transposed conv reads at
    most a 2x2 window of the input, which a 3x3 conv covers, so this layer
    can represent every transposed conv of that shape; it avoids XLA's slow
    transposed-convolution kernels on GPU (see NOTES.md).
  mode='resize': nearest-neighbour resize + 3x3 conv (the attention net's
    upsampling, paper Sec. 4.3).
  Always followed by instance norm, so the convs carry no bias.
  """
  features: int
  mode: str = "subpixel"
  padding: str = "reflect"
  dtype: Dtype = jnp.float32
  rewrite: bool = False  # 'resize' as a sub-pixel conv; 3x3 convs on the direct CPU kernel

  @nn.compact
  def __call__(self, x):
    if self.mode == "transpose":
      return nn.ConvTranspose(self.features, (3, 3), strides=(2, 2),
                              padding="SAME", use_bias=False, dtype=self.dtype)(x)
    if self.mode == "subpixel":
      x = PadConv(4 * self.features, 3, padding=self.padding, use_bias=False, dtype=self.dtype,
                  rewrite=self.rewrite)(x)
      return depth_to_space(x, 2)
    if self.mode == "resize":
      return PadConv(self.features, 3, padding=self.padding, use_bias=False, dtype=self.dtype,
                     upsample=True, rewrite=self.rewrite)(x)
    raise ValueError(f"unknown upsample mode {self.mode!r}: "
                     "use 'subpixel', 'transpose' or 'resize'")
