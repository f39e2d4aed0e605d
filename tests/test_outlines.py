"""Tests of outlined radiographs: cases, CTR from masks, split, TFDS builder.

Most run on the committed fixture `tests/fixtures/outlines/` (8 real cases
at 64 px, 4 per label; see `tests/fixtures/make_outlines_fixture.py`). The
one marked `needs_real` checks the CTR against the drawn CSV on the real
folder ../shared/ctr_wingspan and is skipped without it.
"""
import csv
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from agcg_jax.data import images
from agcg_jax.data import outlines
from agcg_jax.data import pipeline
from agcg_jax.data import tfds_outlines
from agcg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "outlines")
REAL = os.path.normpath(os.path.join(ROOT, "..", "shared", "ctr_wingspan"))
needs_real = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REAL, "ctr_ground_truth.csv")),
    reason=f"the real outlined set is not at {REAL}")
SIZE = 32
FIXTURE_IDS = sorted(os.listdir(os.path.join(FIXTURE, "png")))


def _copy_fixture(tmp_path):
  dst = tmp_path / "outlines"
  shutil.copytree(FIXTURE, dst)
  return str(dst)


def _mask_path(root, name, case_id):
  return os.path.join(root, "mask", name, case_id)


def _rect(shape, rows, cols):
  m = np.zeros(shape, bool)
  m[rows[0]:rows[1], cols[0]:cols[1]] = True
  return m


# ---------------------------------------------------------------------------
# CTR from masks.


def test_ctr_from_masks_counts_both_end_columns():
  shape = (40, 60)
  heart = _rect(shape, (20, 30), (25, 37))           # columns 25..36: 12
  left = _rect(shape, (5, 35), (33, 55))             # columns 33..54
  right = _rect(shape, (8, 35), (7, 24))             # columns 7..23
  ctr, heart_w, thorax_w = outlines.ctr_from_masks(heart, left, right)
  assert (heart_w, thorax_w) == (12, 48)             # 7..54
  assert ctr == pytest.approx(12 / 48)


def test_ctr_from_masks_empty_is_an_error():
  shape = (10, 10)
  with pytest.raises(ValueError, match="empty heart"):
    outlines.ctr_from_masks(np.zeros(shape, bool), _rect(shape, (0, 5), (0, 5)),
                            _rect(shape, (0, 5), (5, 9)))


@needs_real
def test_ctr_from_masks_matches_the_drawn_csv():
  with open(os.path.join(REAL, "ctr_ground_truth.csv")) as f:
    drawn = {r["id"]: float(r["ctr"]) for r in csv.DictReader(f)}
  cases = {c.id: c for c in outlines.find_cases(REAL)}
  subset = sorted(drawn)[::5]  # 45 of 221: enough, and quick
  errors = [outlines.measure_case(cases[i]).ctr - drawn[i] for i in subset]
  assert np.mean(np.abs(errors)) < 0.01
  assert np.max(np.abs(errors)) < 0.02


# ---------------------------------------------------------------------------
# Cases and their problems.


def test_fixture_scans_clean_with_both_labels():
  measured, report = outlines.scan(FIXTURE, strict=True)
  assert [m.case.id for m in measured] == FIXTURE_IDS
  assert report["used"] == report["cases"] == 8
  assert not any(report["skipped"].values())
  assert sorted(m.label for m in measured) == [0] * 4 + [1] * 4
  for m in measured:
    assert m.label == int(m.ctr > 0.5)
    assert m.ctr == pytest.approx(m.heart_width / m.thorax_width)


def test_threshold_sets_the_label():
  measured, _ = outlines.scan(FIXTURE, threshold=0.6)
  assert [m.label for m in measured] == [int(m.ctr > 0.6) for m in measured]
  assert sum(m.label for m in measured) == 2


def _remove(root, case_id):
  path = _mask_path(root, "heart", case_id)
  os.remove(path)
  return path


def _shrink(root, case_id):
  path = _mask_path(root, "left_lung", case_id)
  with Image.open(path) as im:
    im.resize((32, 32)).save(path)
  return path


def _blank(root, case_id):
  path = _mask_path(root, "right_lung", case_id)
  Image.fromarray(np.full((64, 64), 127, np.uint8)).save(path)  # not > 127
  return path


def _truncate(root, case_id):
  path = _mask_path(root, "heart", case_id)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return path


def _corrupt_image(root, case_id):
  path = os.path.join(root, "png", case_id)
  with open(path, "wb") as f:
    f.write(b"not a png")
  return path


BREAKERS = {"missing_mask": _remove, "size_mismatch": _shrink,
            "empty_mask": _blank, "unreadable_mask": _truncate,
            "unreadable_image": _corrupt_image}


@pytest.mark.parametrize("reason", sorted(BREAKERS))
def test_bad_case_is_one_line_with_strict(tmp_path, reason):
  root = _copy_fixture(tmp_path)
  path = BREAKERS[reason](root, FIXTURE_IDS[2])
  with pytest.raises(UserError) as e:
    outlines.scan(root, strict=True)
  assert e.value.reason == reason
  assert str(e.value).startswith(path + ": ")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("reason", sorted(BREAKERS))
def test_bad_case_is_skipped_and_counted(tmp_path, reason):
  root = _copy_fixture(tmp_path)
  path = BREAKERS[reason](root, FIXTURE_IDS[2])
  measured, report = outlines.scan(root)
  assert FIXTURE_IDS[2] not in [m.case.id for m in measured]
  assert report["used"] == 7 and report["cases"] == 8
  assert report["skipped"] == {r: int(r == reason)
                               for r in outlines.SKIP_REASONS}
  assert report["skipped_files"] == {reason: [path]}


def test_several_problems_counted_by_reason(tmp_path):
  root = _copy_fixture(tmp_path)
  _remove(root, FIXTURE_IDS[0])
  _remove(root, FIXTURE_IDS[1])
  _blank(root, FIXTURE_IDS[5])
  _, report = outlines.scan(root)
  assert report["used"] == 5
  assert report["skipped"]["missing_mask"] == 2
  assert report["skipped"]["empty_mask"] == 1


def test_folder_without_png_is_one_line(tmp_path):
  with pytest.raises(UserError, match="no outlined radiographs"):
    outlines.find_cases(str(tmp_path))
  os.makedirs(tmp_path / "png")
  with pytest.raises(UserError, match="no PNG files"):
    outlines.find_cases(str(tmp_path))


def test_no_usable_case_is_one_line(tmp_path):
  root = _copy_fixture(tmp_path)
  for i in FIXTURE_IDS:
    _remove(root, i)
  with pytest.raises(UserError, match="none of the 8 cases"):
    outlines.scan(root)


# ---------------------------------------------------------------------------
# Loading at a size.


def test_load_case_is_the_stored_record():
  measured, _ = outlines.scan(FIXTURE)
  m = measured[0]
  rec = outlines.load_case(m, SIZE)
  assert rec["image"].shape == rec["heart_mask"].shape == (SIZE, SIZE, 1)
  assert rec["lung_mask"].shape == (SIZE, SIZE, 1)
  for key in ("image", "heart_mask", "lung_mask"):
    assert rec[key].dtype == np.uint8
  assert set(np.unique(rec["heart_mask"])) == {0, 1}
  assert set(np.unique(rec["lung_mask"])) == {0, 1}
  assert rec["ctr"].dtype == np.float32 and rec["ctr"] == np.float32(m.ctr)
  assert rec["label"].dtype == np.int64 and rec["label"] == m.label
  assert rec["id"] == m.case.id
  # The radiograph takes the project's one image path.
  np.testing.assert_array_equal(rec["image"][..., 0],
                                images.load_image(m.case.image, SIZE)[0])
  # Lungs: the union of both, each area-averaged then thresholded.
  with Image.open(m.case.masks[1]) as left:
    small = np.asarray(images.resize_square(left, SIZE)) > 127
  assert np.all(rec["lung_mask"][..., 0][small] == 1)


# ---------------------------------------------------------------------------
# Split.


def _fake(n_no_finding, n_cardiomegaly):
  out = []
  for k in range(n_no_finding + n_cardiomegaly):
    label = int(k >= n_no_finding)
    case = outlines.Case(id=f"{k:03d}.png", image="", masks=("", "", ""))
    out.append(outlines.Measured(case=case, ctr=0.4 + 0.2 * label,
                                 heart_width=1, thorax_width=2, label=label))
  return out


def _ids(split):
  return {s: [m.case.id for m in split[s]] for s in split}


def test_split_is_stratified_disjoint_and_whole():
  cases = _fake(30, 90)
  split = outlines.split_cases(cases, seed=0)
  ids = _ids(split)
  assert not set(ids["train"]) & set(ids["test"])
  assert sorted(ids["train"] + ids["test"]) == [m.case.id for m in cases]
  test_labels = [m.label for m in split["test"]]
  assert test_labels.count(0) == round(30 * 0.25)
  assert test_labels.count(1) == round(90 * 0.25)
  small = outlines.split_cases(cases, seed=0, test_fraction=0.1)
  assert len(small["test"]) == 3 + 9


def test_split_is_a_function_of_seed_and_cases():
  cases = _fake(30, 90)
  first = _ids(outlines.split_cases(cases, seed=3))
  shuffled = [cases[i] for i in np.random.default_rng(1).permutation(120)]
  assert _ids(outlines.split_cases(shuffled, seed=3)) == first
  assert _ids(outlines.split_cases(cases, seed=4)) != first


def test_split_keeps_a_lone_case_for_training():
  split = outlines.split_cases(_fake(1, 4), seed=0, test_fraction=0.5)
  assert [m.label for m in split["train"]].count(0) == 1


def test_split_rejects_a_bad_fraction():
  for fraction in (0.0, 1.0, -0.1):
    with pytest.raises(UserError, match="test fraction"):
      outlines.split_cases(_fake(4, 4), seed=0, test_fraction=fraction)


# ---------------------------------------------------------------------------
# The TFDS dataset, read back through the pipeline.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("outlined"))
  version_dir = tfds_outlines.prepare_outlines(FIXTURE, out, size=SIZE, seed=0)
  return out, version_dir


def test_prepare_writes_dataset_and_report(prepared):
  out, version_dir = prepared
  assert version_dir == pipeline.find_dataset_dir(out)
  with open(os.path.join(out, tfds_outlines.REPORT_NAME)) as f:
    report = json.load(f)
  assert report["tfds_dir"] == os.path.abspath(version_dir)
  assert report["counts"]["train"] == {"No Finding": 3, "Cardiomegaly": 3}
  assert report["counts"]["test"] == {"No Finding": 1, "Cardiomegaly": 1}
  assert report["used"] == 8 and not any(report["skipped"].values())
  info = pipeline.dataset_info(out)
  assert info["name"] == "outlined_chest_xray"
  assert info["image_size"] == SIZE
  assert info["splits"] == {"train": 6, "test": 2}
  assert info["metadata"]["ctr_threshold"] == 0.5


def test_records_read_back_through_the_pipeline(prepared):
  out, _ = prepared
  measured = {m.case.id: m for m in outlines.scan(FIXTURE)[0]}
  source = pipeline.open_source(out, "test")
  rec = source[0]
  case_id = rec["id"].decode() if isinstance(rec["id"], bytes) else rec["id"]
  expected = outlines.load_case(measured[case_id], SIZE)
  for key in ("image", "heart_mask", "lung_mask"):
    np.testing.assert_array_equal(rec[key], expected[key])
  assert rec["label"] == expected["label"]
  assert np.float32(rec["ctr"]) == expected["ctr"]

  batch = next(pipeline.eval_batches(source, batch_size=4))
  assert batch["valid"].tolist() == [True, True, False, False]
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["heart_mask"].shape == (4, SIZE, SIZE, 1)
  assert batch["heart_mask"].dtype == np.uint8
  assert batch["ctr"].dtype == np.float32
  assert set(batch["id"][:2]) == {m.case.id for m in outlines.split_cases(
      list(measured.values()), seed=0)["test"]}

  train = pipeline.open_source(out, "train")
  it = pipeline.classifier_batches(train, batch_size=3, seed=0,
                                   fields=("heart_mask", "lung_mask", "ctr"))
  batch = next(it)
  assert batch["heart_mask"].shape == (3, SIZE, SIZE, 1)
  assert batch["heart_mask"].dtype == np.float32
  assert batch["ctr"].shape == (3,)
  assert sorted(pipeline.labels_of(train).tolist()) == [0, 0, 0, 1, 1, 1]


def test_prepare_again_keeps_the_build(prepared):
  out, version_dir = prepared
  info = os.path.join(version_dir, "dataset_info.json")
  mtime = os.path.getmtime(info)
  assert tfds_outlines.prepare_outlines(FIXTURE, out, size=SIZE) == version_dir
  assert os.path.getmtime(info) == mtime
  with open(os.path.join(out, tfds_outlines.REPORT_NAME)) as f:
    assert json.load(f)["tfds_rebuilt"] is False


def test_prepare_rebuilds_when_cases_change(tmp_path):
  root = _copy_fixture(tmp_path)
  out = str(tmp_path / "out")
  tfds_outlines.prepare_outlines(root, out, size=SIZE)
  _remove(root, FIXTURE_IDS[0])
  version_dir = tfds_outlines.prepare_outlines(root, out, size=SIZE)
  with open(os.path.join(out, tfds_outlines.REPORT_NAME)) as f:
    report = json.load(f)
  assert report["tfds_rebuilt"] is True
  assert report["skipped"]["missing_mask"] == 1
  assert report["skipped_files"]["missing_mask"] == [
      _mask_path(root, "heart", FIXTURE_IDS[0])]
  assert sum(pipeline.dataset_info(version_dir)["splits"].values()) == 7


def test_prepare_strict_stops_at_a_bad_case(tmp_path):
  root = _copy_fixture(tmp_path)
  path = _blank(root, FIXTURE_IDS[3])
  with pytest.raises(UserError, match="empty mask") as e:
    tfds_outlines.prepare_outlines(root, str(tmp_path / "out"), size=SIZE,
                                   strict=True)
  assert str(e.value).startswith(path)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 8}, "--size"), ({"seed": -1}, "--seed"),
    ({"test_fraction": 1.0}, "--test-fraction"),
    ({"threshold": 1.5}, "--threshold")])
def test_prepare_rejects_bad_options(tmp_path, kwargs, match):
  with pytest.raises(UserError, match=match):
    tfds_outlines.prepare_outlines(FIXTURE, str(tmp_path), **kwargs)


def test_config_name_says_the_options():
  assert tfds_outlines.config_name(64, 0, 0.25, 0.5) == "s64_seed0_test25_ctr50"
  assert tfds_outlines.config_name(128, 2, 1 / 3, 0.55) == (
      "s128_seed2_test33p3333_ctr55")


def test_builder_alone_reads_the_manual_dir(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_outlines.OutlinedChestXray(
      config=tfds_outlines.OutlineConfig.make(size=SIZE, seed=1),
      data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_dir=str(tmp_path / "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=FIXTURE))
  info = pipeline.dataset_info(str(tmp_path))
  assert info["config"] == "s32_seed1_test25_ctr50"
  assert info["splits"] == {"train": 6, "test": 2}
  assert "fingerprint" in info["metadata"]
