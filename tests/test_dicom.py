"""Tests of DICOM reading: DICOMs written by pydicom from a real fixture PNG.

Each DICOM stores the PNG's grey levels in another encoding (8, 12-in-16 and
16 bits, signed, MONOCHROME1, rescaled, windowed, through a VOI LUT); the
8-bit image read back must be the PNG's pixels.
"""
import os

import numpy as np
from PIL import Image
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom import uid  # noqa: E402

from agcg_jax.data import dicom  # noqa: E402
from agcg_jax.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = os.path.join(ROOT, "tests", "fixtures", "nih", "images",
                   "00000211_041.png")
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation


@pytest.fixture(scope="module")
def png():
  with Image.open(PNG) as im:
    assert im.mode == "L"
    return np.asarray(im, np.uint8)


def _dataset(sop_class=DX) -> Dataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  return ds


def _write(path, stored, photometric="MONOCHROME2", bits=None, **tags):
  ds = _dataset()
  bits = bits or stored.dtype.itemsize * 8
  ds.set_pixel_data(stored, photometric, bits)
  for key, value in tags.items():
    setattr(ds, key, value)
  ds.save_as(path, enforce_file_format=True)
  return str(path)


def _12bit(x):
  return np.rint(x.astype(np.float64) * 4095 / 255).astype(np.uint16)


# --- what a viewer shows equals the PNG ------------------------------------


@pytest.mark.parametrize("case", [
    "mono2_8bit", "mono2_12in16", "mono2_16bit", "mono1_12in16",
    "mono1_16bit", "signed_16bit", "rescale_12in16"])
def test_stored_encodings_read_back_exactly(tmp_path, png, case):
  path = tmp_path / f"{case}.dcm"
  if case == "mono2_8bit":
    _write(path, png)
  elif case == "mono2_12in16":
    _write(path, _12bit(png), bits=12)
  elif case == "mono2_16bit":
    _write(path, png.astype(np.uint16) * 257)
  elif case == "mono1_12in16":
    _write(path, 4095 - _12bit(png), "MONOCHROME1", bits=12)
  elif case == "mono1_16bit":
    _write(path, 65535 - png.astype(np.uint16) * 257, "MONOCHROME1")
  elif case == "signed_16bit":
    _write(path, (png.astype(np.int32) * 257 - 32768).astype(np.int16))
  elif case == "rescale_12in16":
    # Values -1000 .. 7190 after rescale; the stored range maps onto 0..255.
    _write(path, _12bit(png), bits=12, RescaleSlope=2, RescaleIntercept=-1000)
  got = dicom.read_dicom(str(path))
  assert got.dtype == np.uint8 and got.shape == png.shape
  np.testing.assert_array_equal(got, png)


def test_window_maps_its_range_and_clips_outside(tmp_path, png):
  # Stored 1000 + 4p: the window [1000, 2020] maps back onto p.
  stored = (1000 + 4 * png.astype(np.uint16))
  stored[:8, :8] = 500     # below the window -> black
  stored[-8:, -8:] = 4000  # above -> white
  path = _write(tmp_path / "window.dcm", stored, bits=12,
                WindowCenter=1510.5, WindowWidth=1021)
  got = dicom.read_dicom(path).astype(int)
  expected = png.astype(int).copy()
  expected[:8, :8] = 0
  expected[-8:, -8:] = 255
  assert np.abs(got - expected).max() <= 1
  assert (got[:8, :8] == 0).all() and (got[-8:, -8:] == 255).all()


def test_rescale_then_window_then_monochrome1(tmp_path, png):
  # Stored s = 8q (q = 255 - p), rescaled to 4q + 100, windowed over
  # [100, 1120] onto q, then inverted: p.
  q = 255 - png.astype(np.uint16)
  path = _write(tmp_path / "rw1.dcm", 8 * q, "MONOCHROME1", bits=12,
                RescaleSlope=0.5, RescaleIntercept=100,
                WindowCenter=610.5, WindowWidth=1021)
  got = dicom.read_dicom(path).astype(int)
  assert np.abs(got - png.astype(int)).max() <= 1


def test_voi_lut_sequence(tmp_path, png):
  ds = _dataset()
  ds.set_pixel_data(_12bit(png), "MONOCHROME2", 12)
  item = Dataset()
  item.add_new("LUTDescriptor", "US", [4096, 0, 8])
  item.add_new("LUTData", "US",
               np.rint(np.arange(4096) * 255 / 4095).astype(int).tolist())
  ds.VOILUTSequence = [item]
  # A window too, which the LUT takes precedence over.
  ds.WindowCenter, ds.WindowWidth = 100, 50
  path = str(tmp_path / "voilut.dcm")
  ds.save_as(path, enforce_file_format=True)
  np.testing.assert_array_equal(dicom.read_dicom(path), png)


def test_is_dicom(tmp_path, png):
  path = _write(tmp_path / "no_suffix", png)
  assert dicom.is_dicom(path)
  assert dicom.is_dicom(str(tmp_path / "x.DCM"))
  assert not dicom.is_dicom(PNG)


# --- refused, in one line naming the file ----------------------------------


def _refused(path, match):
  with pytest.raises(UserError, match=match) as info:
    dicom.read_dicom(str(path))
  message = str(info.value)
  assert str(path) in message and "\n" not in message
  return message


def test_multiframe_refused(tmp_path, png):
  path = _write(tmp_path / "multi.dcm", np.stack([png, png]))
  _refused(path, "multi-frame DICOM \\(2 frames\\)")


def test_non_image_refused(tmp_path):
  ds = _dataset("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
  ds.Modality = "SR"
  path = tmp_path / "report.dcm"
  ds.save_as(str(path), enforce_file_format=True)
  _refused(path, "without pixel data.*not an image")


def test_colour_refused(tmp_path, png):
  path = _write(tmp_path / "rgb.dcm", np.stack([png] * 3, -1), "RGB")
  _refused(path, "colour DICOM \\(RGB")


def test_not_dicom_refused(tmp_path):
  _refused(PNG, "not a DICOM file")
  empty = tmp_path / "empty.dcm"
  empty.write_bytes(b"")
  _refused(empty, "DICOM")


def test_undecodable_compression_refused(tmp_path, png):
  from pydicom.encaps import encapsulate  # pylint: disable=g-import-not-at-top
  ds = _dataset()
  ds.set_pixel_data(png, "MONOCHROME2", 8)
  ds.file_meta.TransferSyntaxUID = uid.JPEG2000Lossless
  ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
  ds["PixelData"].VR = "OB"
  path = tmp_path / "j2k.dcm"
  ds.save_as(str(path), enforce_file_format=True)
  _refused(path, "cannot decode its pixel data")
