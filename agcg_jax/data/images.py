"""The one place that decodes a radiograph file and converts it to the stored format.

8-bit grayscale, square, antialiased: NIH preparation, class-folder and
outlined datasets, and `agcg explain` all read images through `load_image`,
so a PNG gives the same pixels whichever path it takes.

Imports neither TFDS nor JAX: conversion workers import it and should start
fast.
"""
import importlib
import math
import zlib

import numpy as np
from PIL import Image
from PIL import ImageOps

from agcg_jax.errors import UserError

NORMALIZE_OPTIONS = ("none", "equalize", "clahe")
# CLAHE's clip limit (scikit-image's default 0.01 of the tile's pixels).
CLAHE_CLIP_LIMIT = 0.01
# What a corrupt, truncated or unsupported file raises while decoding.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error,
               Image.DecompressionBombError)


def to_gray8(image: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit grayscale ("L").

  RGBA / LA / P: composited over black (transparent = no signal), then
  luminance; the release's RGBA files have R = G = B and opaque alpha, so
  this is exact. 16-bit and 32-bit integers: scaled by the bit depth the
  values actually use (12-bit data in a 16-bit PNG -> x * 255 / 4095), never
  clipped to 255 the way `Image.convert("L")` does.
  """
  mode = image.mode
  if mode == "L":
    return image
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and
                                      "transparency" in image.info):
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("L")
  if mode.startswith("I") or mode == "F":
    values = np.asarray(image)
    if values.ndim != 2:
      raise ValueError(f"unsupported image mode {mode}")
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
      raise ValueError("non-finite pixel values")
    values -= min(0.0, float(values.min()))
    top = float(values.max())
    if mode == "F" and top <= 1.0:
      scale = 255.0
    else:
      bits = max(8, int(math.ceil(top)).bit_length())
      scale = 255.0 / (2 ** bits - 1)
    return Image.fromarray(
        np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
  return image.convert("L")


def resize_square(gray: Image.Image, size: int) -> Image.Image:
  """Grayscale image of any size -> [size, size], antialiased.

  Downscaling averages areas: `Image.reduce` (a box filter, 0.4 ms for
  1024 -> 256 against 1.8 ms for a BOX `resize`, 8.6 for Lanczos) for exact
  integer factors, a BOX `resize` (exact area weights) otherwise. Upscaling
  is bicubic. A non-square image is stretched; boxes are scaled per axis
  the same way.
  """
  width, height = gray.size
  if (width, height) == (size, size):
    return gray
  if width % size == 0 and height % size == 0:
    return gray.reduce((width // size, height // size))
  if width >= size and height >= size:
    return gray.resize((size, size), Image.Resampling.BOX)
  return gray.resize((size, size), Image.Resampling.BICUBIC)


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int], str]:
  """Decodes one radiograph to the stored format.

  Args:
    path: a PNG, JPEG, 8- or 16-bit (anything PIL reads), or a DICOM file
      (by suffix or its "DICM" preamble; dicom.read_dicom applies the
      modality and VOI transforms, MONOCHROME1 inverted).
    size: stored side length S.

  Returns:
    (uint8 [S, S] grayscale, (width, height) of the decoded file, its PIL
    mode).

  Raises:
    OSError, SyntaxError, ValueError, zlib.error: the file is corrupt or
    truncated.
    UserError: a DICOM this tool cannot show (multi-frame, colour, no pixels).
  """
  from agcg_jax.data import dicom  # pylint: disable=g-import-not-at-top
  if dicom.is_dicom(path):
    pixels = dicom.read_dicom(path)
    stored = resize_square(Image.fromarray(pixels), size)
    return np.asarray(stored, dtype=np.uint8), (pixels.shape[1], pixels.shape[0]), "DICOM"
  with Image.open(path) as image:
    image.load()  # Decode now, so that a truncated file fails here.
    mode = image.mode
    source_size = image.size
    if source_size[0] < 1 or source_size[1] < 1:
      raise ValueError("empty image")
    stored = resize_square(to_gray8(image), size)
  return np.asarray(stored, dtype=np.uint8), source_size, mode


def conversion_kind(mode: str) -> str:
  """A PIL mode -> "L" (none needed), "rgba", "16bit", "rgb" or "other"."""
  if mode == "L":
    return "L"
  if mode in ("RGBA", "LA", "PA"):
    return "rgba"
  if mode.startswith("I") or mode == "F":
    return "16bit"
  return "rgb" if mode == "RGB" else "other"


def check_normalize(normalize: str) -> None:
  """UserError unless `normalize` is an option this installation can run."""
  if normalize not in NORMALIZE_OPTIONS:
    raise UserError(f"normalize must be one of {', '.join(NORMALIZE_OPTIONS)}"
                    f", not {normalize!r}")
  if normalize == "clahe":
    try:
      importlib.import_module("skimage.exposure")
    except ImportError:
      raise UserError("normalize='clahe' needs scikit-image, which is not "
                      "installed: pip install scikit-image (or use "
                      "normalize='equalize')") from None


def normalize_image(gray: np.ndarray, normalize: str) -> np.ndarray:
  """Intensity normalisation of one stored image.

  Args:
    gray: uint8 [H, W].
    normalize: "none"; "equalize": global histogram equalisation
      (`PIL.ImageOps.equalize`); "clahe": contrast-limited adaptive
      equalisation (`skimage.exposure.equalize_adapthist`, 8x8 tiles, clip
      limit CLAHE_CLIP_LIMIT), which needs scikit-image.

  Returns:
    uint8 [H, W].
  """
  if normalize == "none":
    return gray
  if normalize == "equalize":
    return np.asarray(ImageOps.equalize(Image.fromarray(gray)), np.uint8)
  if normalize == "clahe":
    check_normalize(normalize)
    from skimage import exposure  # pylint: disable=g-import-not-at-top
    out = exposure.equalize_adapthist(gray, clip_limit=CLAHE_CLIP_LIMIT)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
  check_normalize(normalize)
  raise AssertionError(normalize)
