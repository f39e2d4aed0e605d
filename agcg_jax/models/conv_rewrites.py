"""Exact rewrites of convolutions XLA:CPU runs slowly: same parameters, same sums.

1. Thin convs. The generator's and the attention net's 7x7 first and last layers map 1 -> w
and w -> 1 channels at full resolution. XLA:CPU runs them at a few GFLOP/s
(forward + both gradients of the demo's 1 -> 8 and 8 -> 1 layers at 64 px,
batch 4: 3.9 and 5.6 ms, 41% of the step's convolution time;
benchmarks/conv_lowering.py). The same sums as matmuls of a useful shape:

  one input channel  (`one_in`):  each output row block of `block` pixels reads
      a k x (block + k - 1) window; one matmul with a banded (Toeplitz) matrix
      built from the kernel gives block x features outputs at once.
  one output channel (`one_out`): the k vertical shifts stacked on channels,
      one matmul to the k horizontal taps, then the k shifted columns summed.

`one_out`'s input gradient is a one-input conv (of the padded output gradient
with the flipped kernel), so it uses `one_in`; its kernel gradient is XLA's.
Where cpu_kernels.py's thin kernels are built (7x7, 8-64 channels on the wide
side) `conv_general_dilated` uses those instead, and 3x3 convs of stride 1 or 2
go to its direct kernel; it has lax's signature (flax's
`nn.Conv(conv_general_dilated=)`) and falls back to lax for every other conv.

2. Nearest 2x upsampling + 3x3 conv (the attention net's upsampling layer).
Each output pixel of a phase (p, q) reads a 2x2 window of the low-resolution
input, so the layer is one 3x3 conv at the low resolution to 4x the channels
(the kernel's taps summed per phase), then pixel shuffle: the same sums on a
quarter of the pixels with 4x wider outputs (`upsample2x_conv`). Reflect
padding of the upsampled image is edge padding of the low-resolution one.

Both: the same result up to float rounding (tests/test_conv_rewrites.py);
`model.conv_rewrites` turns them on ('auto': on the CPU backend).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agcg_jax.errors import UserError
from agcg_jax.models.cpu_kernels import conv3x3, supported as direct_supported
from agcg_jax.models.cpu_kernels import thin_conv, thin_supported

_DIMS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w):
  """VALID, stride-1 NHWC/HWIO conv by XLA."""
  return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DIMS)


@functools.lru_cache(maxsize=None)
def _band(k: int, win: int, block: int) -> np.ndarray:
  """S[u, v, j] = 1 where window column u feeds output column v through tap j (u = v + j)."""
  s = np.zeros((win, block, k), np.float32)
  for v in range(block):
    s[np.arange(k) + v, v, np.arange(k)] = 1.0
  return s


def one_in(x: jnp.ndarray, w: jnp.ndarray, block: int = 8) -> jnp.ndarray:
  """VALID conv of x [N, H, W, C] with w [k, k, C, F] as banded matmuls (meant for C == 1)."""
  k, _, c, f = w.shape
  n, h, width, _ = x.shape
  ho, wo = h - k + 1, width - k + 1
  nb = -(-wo // block)
  if nb * block != wo:  # whole blocks: pad the width, crop the output
    x = jnp.pad(x, ((0, 0), (0, 0), (0, nb * block - wo), (0, 0)))
  win = block + k - 1
  band = jnp.einsum("uvj,ijcf->iucvf", _band(k, win, block).astype(w.dtype), w)
  rows = jnp.stack([x[:, i:i + ho] for i in range(k)], axis=2)  # N, Ho, k, W', C
  windows = jnp.stack([rows[:, :, :, b * block:b * block + win] for b in range(nb)], axis=2)
  out = windows.reshape(-1, k * win * c) @ band.reshape(k * win * c, block * f)
  return out.reshape(n, ho, nb * block, f)[:, :, :wo]


def _one_out_forward(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  k, _, c, f = w.shape
  n, h, width, _ = x.shape
  ho, wo = h - k + 1, width - k + 1
  rows = jnp.concatenate([x[:, i:i + ho] for i in range(k)], axis=-1)  # N, Ho, W, k*C
  taps = (rows @ w.transpose(0, 2, 1, 3).reshape(k * c, k * f)).reshape(n, ho, width, k, f)
  return sum(taps[:, :, j:j + wo, j] for j in range(k))


@jax.custom_vjp
def one_out(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """VALID conv of x [N, H, W, C] with w [k, k, C, F] (meant for F == 1)."""
  return _one_out_forward(x, w)


def _one_out_fwd(x, w):
  return _one_out_forward(x, w), (x, w)


def _one_out_bwd(res, g):
  x, w = res
  k = w.shape[0]
  padded = jnp.pad(g, ((0, 0), (k - 1, k - 1), (k - 1, k - 1), (0, 0)))
  dx = one_in(padded, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  _, kernel_vjp = jax.vjp(lambda w_: lax_conv(x, w_), w)
  return dx, kernel_vjp(g)[0]


one_out.defvjp(_one_out_fwd, _one_out_bwd)


def _plain_geometry(x_shape, w_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count) -> tuple[int, int] | None:
  """(dilation, stride) of a VALID, ungrouped NHWC/HWIO conv (each equal in H and W), else None."""
  if len(x_shape) != 4 or feature_group_count != 1:
    return None
  s = tuple(window_strides)
  if s[0] != s[1] or not _is_valid(padding):
    return None
  if lhs_dilation is not None and tuple(lhs_dilation) != (1, 1):
    return None
  d = (1, 1) if rhs_dilation is None else tuple(rhs_dilation)
  if d[0] != d[1]:
    return None
  dims = lambda numbers: lax.conv_dimension_numbers(x_shape, w_shape, numbers)
  if dimension_numbers is not None and dims(dimension_numbers) != dims(_DIMS):
    return None
  return d[0], s[0]


def applies(x_shape, w_shape, window_strides=(1, 1), padding="VALID", lhs_dilation=None,
            rhs_dilation=None, dimension_numbers=None, feature_group_count=1) -> bool:
  """Whether a conv is a thin one `conv_general_dilated` computes as matmuls."""
  geometry = _plain_geometry(x_shape, w_shape, window_strides, padding, lhs_dilation,
                             rhs_dilation, dimension_numbers, feature_group_count)
  k, k2, c, f = w_shape
  return geometry == (1, 1) and k == k2 and k >= 5 and (c == 1 or f == 1)


def _is_valid(padding) -> bool:
  if isinstance(padding, str):
    return padding.upper() == "VALID"
  return all(tuple(p) == (0, 0) for p in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **kwargs):
  """lax.conv_general_dilated, with thin k x k convs (k >= 5, one channel in or out) on the thin
  kernels or as matmuls, and 3x3 convs of stride 1 or 2 and the widths cpu_kernels.py compiles
  on its direct kernel."""
  args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count)
  if applies(lhs.shape, rhs.shape, *args):
    if thin_supported(rhs.shape, lhs.dtype, rhs.dtype):
      return thin_conv(lhs, rhs)
    return one_in(lhs, rhs) if rhs.shape[2] == 1 else one_out(lhs, rhs)
  geometry = _plain_geometry(lhs.shape, rhs.shape, *args)
  if geometry is not None and geometry[1] in (1, 2) and direct_supported(rhs.shape, lhs.dtype,
                                                                          rhs.dtype):
    return conv3x3(lhs, rhs, *geometry)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, **kwargs)


# _PHASE_TAPS[p, a, i] = 1 where tap i of a 3x3 kernel on the 2x-upsampled image
# reads low-resolution offset a (of the 1-padded input) for output phase p.
_PHASE_TAPS = np.zeros((2, 3, 3), np.float32)
_PHASE_TAPS[0, 0, 0] = _PHASE_TAPS[0, 1, 1] = _PHASE_TAPS[0, 1, 2] = 1.0
_PHASE_TAPS[1, 1, 0] = _PHASE_TAPS[1, 1, 1] = _PHASE_TAPS[1, 2, 2] = 1.0


def upsample2x_conv(x: jnp.ndarray, w: jnp.ndarray, padding: str = "reflect") -> jnp.ndarray:
  """conv3x3(pad(nearest_upsample_2x(x), 1)) for x [N, H, W, C], w [3, 3, C, F] -> [N, 2H, 2W, F].

  `padding` of the upsampled image: 'reflect' or 'zeros'.
  """
  if w.shape[:2] != (3, 3):
    raise ValueError(f"upsample2x_conv needs a 3x3 kernel, got {w.shape}")
  n, h, width, _ = x.shape
  c, f = w.shape[2:]
  taps = jnp.asarray(_PHASE_TAPS, w.dtype)
  w4 = jnp.einsum("pai,qbj,ijcf->abcpqf", taps, taps, w).reshape(3, 3, c, 4 * f)
  mode = "edge" if padding == "reflect" else "constant"
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
  y = conv_general_dilated(xp, w4, (1, 1), "VALID", dimension_numbers=_DIMS)
  y = y.reshape(n, h, width, 2, 2, f).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * width, f)


def resolve(setting: str) -> bool:
  """model.conv_rewrites: 'auto' (on for the CPU backend), 'on' or 'off'."""
  if setting not in ("auto", "on", "off"):
    raise UserError(f"--config.model.conv_rewrites must be 'auto', 'on' or 'off', got {setting!r}")
  return jax.default_backend() == "cpu" if setting == "auto" else setting == "on"
