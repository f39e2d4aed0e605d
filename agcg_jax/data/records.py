"""The one place that knows the common on-disk record and its conversion to floats.

Every prepared dataset (phantoms, NIH) is a TFDS dataset of array_record
files whose examples hold at least:

  image: uint8 [S, S, 1], grayscale, antialiased resize to the configured size
  label: int64, 0 = "No Finding", 1 = "Cardiomegaly" (CLASS_NAMES order)
  id:    str, the image's file name or phantom id

Builders add their own fields (phantom ground truth, NIH boxes); the
pipeline passes numeric ones through.
"""
import numpy as np

CLASS_NAMES = ("No Finding", "Cardiomegaly")
NUM_CLASSES = len(CLASS_NAMES)
# Short names for file names, metric keys and figure titles.
CLASS_KEYS = ("no_finding", "cardiomegaly")
# Translation direction of a source image of class c: into the other class.
DIRECTIONS = tuple(f"to_{k}" for k in CLASS_KEYS)
# Translation direction -> (source class, target class), as names.
DIRECTION_NAMES = {d: (CLASS_NAMES[1 - i], CLASS_NAMES[i]) for i, d in enumerate(DIRECTIONS)}


def other(key: str) -> str:
  """The other class's key (CLASS_KEYS): the domain an image of class `key` is translated into."""
  a, b = CLASS_KEYS
  return b if key == a else a


def direction_of(label: int) -> str:
  """The direction a source image of class `label` is translated in."""
  return DIRECTIONS[1 - int(label)]


def to_float(image_u8: np.ndarray) -> np.ndarray:
  """uint8 [..., S, S, 1] in [0, 255] -> float32 in [-1, 1] (paper Sec. 4.1)."""
  return image_u8.astype(np.float32) * (2.0 / 255.0) - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 in [0, 255], clipped; the inverse of `to_float`."""
  x = (np.asarray(image, np.float32) + 1.0) * 127.5
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)
