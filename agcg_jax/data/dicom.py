"""Reading a DICOM radiograph into the 8-bit grayscale a PNG would give.

`read_dicom` applies what a DICOM viewer applies, in the standard's order:

  stored values -> modality LUT (Rescale Slope / Intercept, or a Modality LUT
  Sequence: pydicom's `apply_modality_lut`) -> VOI (the VOI LUT Sequence if
  present, else Window Center / Width: pydicom's `apply_windowing`) ->
  linear onto 0..255 -> inverted if MONOCHROME1.

The 8-bit scaling maps the output range of the last step onto 0..255, as
`images.to_gray8` scales a 16-bit PNG by its bit depth: without a window that
is the range the stored bits can hold after the modality LUT (12-bit data ->
x * 255 / 4095), with a window the window's output range, with a VOI LUT the
range of the LUT's entries. Presentation LUT Shape is not applied on top: in
radiography objects it restates the photometric interpretation (INVERSE for
MONOCHROME1), which is already applied.

Refused with a one-line UserError naming the file: not a DICOM file, no pixel
data (a report, a presentation state), more than one frame, colour, or a
compressed transfer syntax this installation cannot decode.

Needs pydicom (>= 3.0: `pydicom.pixels`), imported only when a DICOM is read.
"""
import os

import numpy as np

from agcg_jax.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")


def _pydicom():
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
    import pydicom.pixels  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError("reading DICOM needs pydicom >= 3.0: pip install "
                    "'pydicom>=3.0,<4'") from None
  return pydicom


def is_dicom(path: str) -> bool:
  """True if `path` ends in .dcm / .dicom or starts with the DICOM preamble."""
  if path.lower().endswith(DICOM_SUFFIXES):
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def _output_range(ds) -> tuple[float, float]:
  """The modality LUT's output range: what the stored bits can become.

  The same range pydicom's `apply_windowing` maps a window onto, so a
  windowed and an unwindowed image are scaled alike.
  """
  bits = int(ds.BitsStored)
  if ds.get("ModalityLUTSequence"):
    return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
  if int(ds.get("PixelRepresentation", 0)) == 0:
    lo, hi = 0.0, float(2 ** bits - 1)
  else:
    lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
  slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
  if slope is not None and intercept is not None:
    lo, hi = lo * float(slope) + float(intercept), hi * float(
        slope) + float(intercept)
  return lo, hi


def _apply_voi_lut_sequence(ds, values: np.ndarray
                            ) -> tuple[np.ndarray, tuple[float, float]]:
  """The first VOI LUT of the VOI LUT Sequence, and its output range.

  Written here rather than with pydicom's `apply_voi`: pydicom 3.0.2 indexes
  the table with an array of the entries' dtype, so an 8-bit LUT of 4,096
  entries wraps every input above 255 (measured: input 273 -> entry 17).

  The output range is set by the entries' bit depth, the descriptor's third
  value; some writers say 16 and fill 12 bits, so the depth the entries
  actually use is taken when it is smaller (as `images.to_gray8` does for
  16-bit PNGs).
  """
  item = ds.VOILUTSequence[0]
  entries, first, nominal = (int(v) for v in item.LUTDescriptor)
  entries = entries or 2 ** 16
  if first >= 2 ** 15 and int(ds.get("PixelRepresentation", 0)) == 1:
    first -= 2 ** 16  # First mapped value of a signed image, stored as US.
  data = item["LUTData"]
  if isinstance(data.value, (bytes, bytearray)):  # OW
    little = ds.file_meta.TransferSyntaxUID.is_little_endian
    lut = np.frombuffer(data.value, "<u2" if little else ">u2")[:entries]
  else:
    lut = np.asarray(data.value, np.int64).reshape(-1)[:entries]
  if lut.size == 0:
    raise ValueError("empty VOI LUT")
  index = np.clip(np.rint(values).astype(np.int64) - first, 0, lut.size - 1)
  used = max(8, int(lut.max()).bit_length())
  return lut[index].astype(np.float64), (0.0, float(2 ** min(nominal, used)
                                                      - 1))


def read_dicom(path: str) -> np.ndarray:
  """Decodes a single-frame grayscale DICOM to uint8 [H, W] for display.

  Args:
    path: a DICOM Part 10 file (or a raw dataset pydicom reads).

  Returns:
    uint8 [H, W]: modality LUT, VOI LUT or window, 8-bit scaling and
    MONOCHROME1 inversion applied (module docstring); bright = dense.

  Raises:
    UserError: one line naming the file: unreadable, not an image, several
      frames, colour, or an undecodable transfer syntax.
  """
  pydicom = _pydicom()
  from pydicom import pixels  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    ds = pydicom.dcmread(path)
  except pydicom.errors.InvalidDicomError:
    raise UserError(f"{path}: not a DICOM file") from None
  except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})"
                    ) from None
  if "PixelData" not in ds:
    kind = ds.get("SOPClassUID")
    kind = f" ({kind.name})" if kind is not None else ""
    raise UserError(f"{path}: a DICOM object without pixel data{kind}, "
                    "not an image")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise UserError(f"{path}: a multi-frame DICOM ({frames} frames); export "
                    "the one frame to explain as its own file")
  photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
  samples = int(ds.get("SamplesPerPixel", 1))
  if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise UserError(f"{path}: a colour DICOM ({photometric or 'no photometric'}"
                    f" interpretation, {samples} samples per pixel); "
                    "radiographs are MONOCHROME1 or MONOCHROME2")
  try:
    stored = ds.pixel_array
  except (NotImplementedError, RuntimeError, ValueError, AttributeError) as e:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID",
                     None)
    syntax = syntax.name if syntax is not None else "unknown transfer syntax"
    raise UserError(f"{path}: cannot decode its pixel data ({syntax}: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    "); compressed DICOMs need pylibjpeg[all] or "
                    "python-gdcm") from None
  if stored.ndim != 2:
    raise UserError(f"{path}: pixel data of shape {stored.shape}, expected "
                    "one 2-D frame")
  try:
    lo, hi = _output_range(ds)
    values = pixels.apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
      # Taken before a window, as the standard and pydicom prefer it.
      values, (lo, hi) = _apply_voi_lut_sequence(ds, values)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
      values = pixels.apply_windowing(values, ds)  # onto [lo, hi]: _output_range
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise UserError(f"{path}: bad modality LUT, VOI LUT or window "
                    f"({type(e).__name__}: {e})") from None
  if hi == lo:
    raise UserError(f"{path}: empty value range ({lo} to {hi})")
  scaled = (np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))
  gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  if photometric == "MONOCHROME1":
    gray = 255 - gray  # Inverted in 8 bits, so 255 - x exactly.
  return gray
