"""Tests of NIH ChestX-ray14 reading, cohorts, conversion and the TFDS builder.

Most run on the committed fixture `tests/fixtures/nih/` (14 real images at
128 px, a trimmed label file naming ~300 absent images; see
`tests/fixtures/make_nih_fixture.py`). Those marked `needs_sample` use the
whole real sample at ../shared/nih_sample and are skipped without it.
"""
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from agcg_jax.data import images
from agcg_jax.data import nih
from agcg_jax.data import tfds_nih
from agcg_jax.data import records
from agcg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nih")
SAMPLE = os.path.normpath(os.path.join(ROOT, "..", "shared", "nih_sample"))
needs_sample = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SAMPLE, "images")),
    reason=f"the real NIH sample is not at {SAMPLE}")

SIZE = 64
FIXTURE_SIZE = 128
FIXTURE_IMAGES = sorted(os.listdir(os.path.join(FIXTURE, "images")))
RGBA_IMAGE = "00005813_000.png"          # No Finding, RGBA in the release
BOXED_IMAGE = "00000211_041.png"         # one Cardiomegaly box
# Its row of BBox_List_2017.csv, in pixels of the 1024 px release.
BOXED_XYWH = (224.0, 416.849725238347, 512.0, 430.64406779661)


def _copy_fixture(dst, images=True):
  shutil.copytree(FIXTURE, dst, ignore=None if images else
                  shutil.ignore_patterns("*.png"))
  return str(dst)


def _only_present_rows(data):
  """Cuts the label file of a fixture copy to its images: a full download."""
  path = os.path.join(data, "Data_Entry_2017_v2020.csv")
  present = set(os.listdir(os.path.join(data, "images")))
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:1] + [l for l in lines[1:]
                              if l.split(",", 1)[0] in present])


def _read_split(tfds_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(tfds_dir).as_data_source(split)
  return [source[i] for i in range(len(source))]


def _name(example):
  return example["id"].decode() if isinstance(example["id"], bytes) else (
      example["id"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Every present fixture image (split=paper, balance=none) at 64 px."""
  out = str(tmp_path_factory.mktemp("nih_out"))
  report = tfds_nih.prepare_nih(FIXTURE, out, size=SIZE, split="paper",
                           balance="none", workers=1)
  return out, report


# --- splits and counts ------------------------------------------------------


@needs_sample
def test_paper_split_reproduces_table_1():
  cohort = nih.build_cohort(SAMPLE, split="paper", seed=0)
  counts = cohort.counts()
  assert counts["train"] == {"No Finding": 48288, "Cardiomegaly": 2220}
  assert counts["test"] == {"No Finding": 12073, "Cardiomegaly": 556}
  assert nih.balanced_counts(counts["train"])["total"] == 4440
  assert cohort.counts(present=True)["all"] == {
      "No Finding": 104, "Cardiomegaly": 243}
  # Table 1 holds for every seed: only the members change.
  other = nih.build_cohort(SAMPLE, split="paper", seed=1)
  assert other.counts() == counts
  assert ({e.name for e in other.entries if e.split == "test"}
          != {e.name for e in cohort.entries if e.split == "test"})


@needs_sample
@pytest.mark.parametrize("split", ["patient", "official"])
def test_patient_disjoint_splits_on_sample(split):
  cohort = nih.build_cohort(SAMPLE, split=split)
  sides = {s: {e.patient for e in cohort.entries if e.split == s}
           for s in nih.SPLIT_NAMES}
  assert not sides["train"] & sides["test"]
  counts = cohort.counts()
  for c in records.CLASS_NAMES:
    assert counts["all"][c] == {"No Finding": 60361, "Cardiomegaly": 2776}[c]
  if split == "patient":
    for c in records.CLASS_NAMES:
      assert 0.17 < counts["test"][c] / counts["all"][c] < 0.23


@pytest.mark.parametrize("split", nih.SPLIT_OPTIONS)
def test_splits_on_fixture(split):
  cohort = nih.build_cohort(FIXTURE, split=split, seed=0)
  assert all(e.split in nih.SPLIT_NAMES for e in cohort.entries)
  counts = cohort.counts()
  if split == "paper":
    for c in records.CLASS_NAMES:
      n = counts["all"][c]
      assert counts["test"][c] == -(-n // 5)  # ceil(n / 5)
  else:
    sides = {s: {e.patient for e in cohort.entries if e.split == s}
             for s in nih.SPLIT_NAMES}
    assert not sides["train"] & sides["test"]
  if split == "official":
    with open(os.path.join(FIXTURE, "test_list.txt")) as f:
      test_list = set(f.read().split())
    assert {e.name for e in cohort.entries if e.split == "test"} == (
        test_list & {e.name for e in cohort.entries})
  again = nih.build_cohort(FIXTURE, split=split, seed=0)
  assert [e.split for e in again.entries] == [e.split for e in cohort.entries]


def test_views_filter():
  both = nih.build_cohort(FIXTURE, views="both")
  pa = nih.build_cohort(FIXTURE, views="PA")
  ap = nih.build_cohort(FIXTURE, views="AP")
  assert {e.view for e in pa.entries} == {"PA"}
  assert {e.view for e in ap.entries} == {"AP"}
  assert len(pa.entries) + len(ap.entries) == len(both.entries)


# --- layouts and label files --------------------------------------------------


def test_kaggle_layout_and_2017_label_file(tmp_path, prepared):
  data = tmp_path / "kaggle"
  for i, name in enumerate(FIXTURE_IMAGES):
    folder = data / f"images_{1 + i % 2:03d}" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.join(FIXTURE, "images", name), folder / name)
  for name in ("BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"):
    shutil.copy(os.path.join(FIXTURE, name), data / name)
  shutil.copy(os.path.join(FIXTURE, "Data_Entry_2017_v2020.csv"),
              data / "Data_Entry_2017.csv")
  cohort = nih.build_cohort(str(data))
  assert cohort.layout == "kaggle"
  assert sorted(cohort.paths) == FIXTURE_IMAGES
  assert cohort.label_file.endswith("Data_Entry_2017.csv")
  # The same dataset as from the NIH layout; two workers run the pool.
  report = tfds_nih.prepare_nih(str(data), str(tmp_path / "out"), size=SIZE,
                           split="paper", balance="none", workers=2)
  assert report["layout"] == "kaggle"
  assert report["fingerprint"] == prepared[1]["fingerprint"]
  assert report["cache"]["converted_now"] == len(FIXTURE_IMAGES)


def test_label_file_with_other_columns(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  path = os.path.join(data, "Data_Entry_2017_v2020.csv")
  with open(path, "w") as f:
    f.write("Image Index,Labels,Patient\n00000001_000.png,Cardiomegaly,1\n")
  with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv") as e:
    nih.build_cohort(data)
  assert "'Finding Labels'" in str(e.value)
  assert "'View Position'" in str(e.value)


def test_missing_data_dir_and_label_file(tmp_path):
  with pytest.raises(UserError, match="--data-dir .*nowhere"):
    tfds_nih.prepare_nih(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="Data_Entry_2017"):
    nih.build_cohort(str(tmp_path / "empty"))
  data = _copy_fixture(tmp_path / "noimages")
  shutil.rmtree(os.path.join(data, "images"))
  with pytest.raises(UserError, match="images_001"):
    nih.build_cohort(data)


def test_official_split_needs_lists(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  os.remove(os.path.join(data, "test_list.txt"))
  with pytest.raises(UserError, match="--split official.*test_list.txt"):
    nih.build_cohort(data, split="official")


def test_bad_box_file(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  with open(os.path.join(data, "BBox_List_2017.csv"), "a") as f:
    f.write("00000001_000.png,Cardiomegaly,1,2,three,4,,\n")
  with pytest.raises(UserError, match="BBox_List_2017.csv, line"):
    nih.build_cohort(data)


@pytest.mark.parametrize("option,kwargs", [
    ("--size", {"size": 4}),
    ("--views", {"views": "LL"}),
    ("--split", {"split": "random"}),
    ("--balance", {"balance": "oversample"}),
    ("--seed", {"seed": -1}),
    ("--workers", {"workers": 0}),
])
def test_bad_options(tmp_path, option, kwargs):
  with pytest.raises(UserError, match=option):
    tfds_nih.prepare_nih(FIXTURE, str(tmp_path / "out"), **kwargs)


def test_empty_cohort(tmp_path):
  # No AP row in the label file, asked for AP only.
  data = _copy_fixture(tmp_path / "pa_only")
  path = os.path.join(data, "Data_Entry_2017_v2020.csv")
  with open(path) as f:
    text = f.read().replace(",AP,", ",PA,")
  with open(path, "w") as f:
    f.write(text)
  with pytest.raises(UserError, match="empty cohort.*--views AP"):
    tfds_nih.prepare_nih(data, str(tmp_path / "out"), views="AP", size=SIZE)
  # Image folder present but none of the cohort's images in it.
  data = _copy_fixture(tmp_path / "no_pngs", images=False)
  with pytest.raises(UserError, match="empty cohort.*no_pngs"):
    tfds_nih.prepare_nih(data, str(tmp_path / "out2"), size=SIZE)


# --- conversion ---------------------------------------------------------------


def test_to_gray8_16bit_scales_by_bit_depth():
  ramp12 = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
  gray = images.to_gray8(Image.fromarray(ramp12))
  assert images.conversion_kind(Image.fromarray(ramp12).mode) == "16bit"
  np.testing.assert_array_equal(
      np.asarray(gray), np.rint(ramp12 * (255 / 4095)).astype(np.uint8))
  full = np.array([[0, 32768, 65535]], dtype=np.uint16)
  gray = images.to_gray8(Image.fromarray(full))
  np.testing.assert_array_equal(np.asarray(gray), [[0, 128, 255]])


def test_resize_is_area_average():
  pixels = np.random.default_rng(0).integers(0, 256, (128, 128), np.uint8)
  small = np.asarray(images.resize_square(Image.fromarray(pixels), 32))
  means = pixels.reshape(32, 4, 32, 4).astype(np.float64).mean((1, 3))
  assert np.abs(small - means).max() <= 0.5 + 1e-9
  odd = images.resize_square(Image.fromarray(pixels), 48)  # non-integer factor
  assert odd.size == (48, 48)
  assert abs(np.asarray(odd).mean() - pixels.mean()) < 1.0


def test_16bit_png_prepared(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  name = "00000002_000.png"
  yy, xx = np.mgrid[0:FIXTURE_SIZE, 0:FIXTURE_SIZE]
  ramp = ((xx + yy) * 4095 // (2 * FIXTURE_SIZE - 2)).astype(np.uint16)
  Image.fromarray(ramp).save(os.path.join(data, "images", name))
  with Image.open(os.path.join(data, "images", name)) as im:
    assert im.mode.startswith("I")  # a real 16-bit PNG
  report = tfds_nih.prepare_nih(data, str(tmp_path / "out"), size=SIZE,
                           split="paper", balance="none", workers=1)
  assert report["converted"]["16bit"] == 1
  stored = {_name(ex): ex["image"] for s in nih.SPLIT_NAMES
            for ex in _read_split(report["tfds_dir"], s)}[name][..., 0]
  expected = (ramp * (255 / 4095)).reshape(SIZE, 2, SIZE, 2).mean((1, 3))
  assert np.abs(stored - expected).max() <= 1.0
  assert stored.max() >= 250  # scaled to the full range, not clipped


def test_rgba_converted(prepared):
  _, report = prepared
  assert report["converted"]["rgba"] == 3
  with Image.open(os.path.join(FIXTURE, "images", RGBA_IMAGE)) as im:
    assert im.mode == "RGBA"
    channels = np.asarray(im)
  assert (channels[..., 3] == 255).all()
  expected = channels[..., 0].astype(np.float64).reshape(
      SIZE, 2, SIZE, 2).mean((1, 3))
  stored = {_name(ex): ex["image"] for s in nih.SPLIT_NAMES
            for ex in _read_split(report["tfds_dir"], s)}[RGBA_IMAGE]
  assert np.abs(stored[..., 0] - expected).max() <= 0.5 + 1e-9


def test_truncated_png_skipped_or_fatal(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  name = "00000129_000.png"
  path = os.path.join(data, "images", name)
  with open(path, "rb") as f:
    head = f.read()[: os.path.getsize(path) // 2]
  with open(path, "wb") as f:
    f.write(head)
  report = tfds_nih.prepare_nih(data, str(tmp_path / "out"), size=SIZE,
                           split="paper", balance="none", workers=1)
  assert report["unreadable"]["count"] == 1
  assert report["unreadable"]["files"][0]["file"].endswith(name)
  ids = {_name(ex) for s in nih.SPLIT_NAMES
         for ex in _read_split(report["tfds_dir"], s)}
  assert name not in ids and len(ids) == len(FIXTURE_IMAGES) - 1
  _only_present_rows(data)  # So that --strict fails on this, not on missing.
  with pytest.raises(UserError, match=name):
    tfds_nih.prepare_nih(data, str(tmp_path / "out_strict"), size=SIZE,
                    split="paper", balance="none", workers=1, strict=True)


def test_missing_images_counted_or_fatal(tmp_path, prepared):
  _, report = prepared
  cohort = nih.build_cohort(FIXTURE)
  assert report["missing"]["count"] == len(cohort.entries) - len(
      FIXTURE_IMAGES) > 200
  assert report["counts"]["present"]["all"] == {
      "No Finding": 6, "Cardiomegaly": 8}
  with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv are missing"):
    tfds_nih.prepare_nih(FIXTURE, str(tmp_path / "out"), size=SIZE, strict=True)
  data = _copy_fixture(tmp_path / "complete")
  _only_present_rows(data)
  report = tfds_nih.prepare_nih(data, str(tmp_path / "out2"), size=SIZE,
                           split="paper", balance="none", strict=True,
                           workers=1)
  assert report["missing"]["count"] == 0


# --- the TFDS dataset -----------------------------------------------------


def test_dataset_read_back(prepared):
  out, report = prepared
  with open(os.path.join(out, "cohort.json")) as f:
    assert json.load(f) == report
  assert report["tfds_dir"].endswith(
      os.path.join("nih_chest_xray14",
                   "size64_both_paper_none_seed0", "1.1.0"))
  cohort = nih.build_cohort(FIXTURE, split="paper")
  truth = {e.name: e for e in cohort.entries}
  seen = set()
  for split in nih.SPLIT_NAMES:
    examples = _read_split(report["tfds_dir"], split)
    counts = {c: 0 for c in records.CLASS_NAMES}
    for ex in examples:
      name = _name(ex)
      seen.add(name)
      entry = truth[name]
      assert entry.split == split
      assert ex["image"].shape == (SIZE, SIZE, 1)
      assert ex["image"].dtype == np.uint8
      assert 0 < ex["image"].mean() < 255
      assert ex["label"] == entry.label
      assert ex["patient"] == entry.patient and ex["age"] == entry.age
      assert ex["boxes"].shape == (8, 4) and ex["boxes"].dtype == np.float32
      assert ex["box_labels"].shape == (8,)
      counts[records.CLASS_NAMES[ex["label"]]] += 1
    assert counts == report["counts"]["dataset"][split]
  assert seen == set(FIXTURE_IMAGES)
  assert report["class_weights"]["Cardiomegaly"] == pytest.approx(
      sum(report["counts"]["dataset"]["train"].values())
      / (2 * report["counts"]["dataset"]["train"]["Cardiomegaly"]))


def test_boxes_scaled_to_stored_pixels(prepared):
  _, report = prepared
  examples = {_name(ex): ex for s in nih.SPLIT_NAMES
              for ex in _read_split(report["tfds_dir"], s)}
  ex = examples[BOXED_IMAGE]
  x, y, w, h = (v * SIZE / 1024 for v in BOXED_XYWH)
  np.testing.assert_allclose(ex["cardiomegaly_box"], [x, y, x + w, y + h],
                             rtol=1e-5)
  assert ex["has_cardiomegaly_box"] == 1 and ex["num_boxes"] == 1
  assert ex["box_labels"].tolist() == [1] + [-1] * 7
  np.testing.assert_array_equal(ex["boxes"][1:], 0)
  # Two findings' boxes on one image; another with no Cardiomegaly box.
  two = examples["00021009_001.png"]
  assert two["num_boxes"] == 2 and two["has_cardiomegaly_box"] == 1
  other = examples["00000211_010.png"]
  assert other["num_boxes"] >= 1 and other["has_cardiomegaly_box"] == 0
  np.testing.assert_array_equal(other["cardiomegaly_box"], 0)
  assert report["boxes"]["with_cardiomegaly_box"] == 3


def test_rerun_is_a_no_op(prepared):
  out, report = prepared
  cache = report["cache"]["dir"]
  stamps = {n: os.stat(os.path.join(cache, n)).st_mtime_ns
            for n in os.listdir(cache)}
  again = tfds_nih.prepare_nih(FIXTURE, out, size=SIZE, split="paper",
                          balance="none", workers=1)
  assert again["cache"]["converted_now"] == 0
  assert again["cache"]["reused"] == len(FIXTURE_IMAGES)
  assert not again["tfds_rebuilt"]
  assert again["fingerprint"] == report["fingerprint"]
  assert stamps == {n: os.stat(os.path.join(cache, n)).st_mtime_ns
                    for n in os.listdir(cache)}


def test_grown_download_rebuilds(tmp_path):
  data = _copy_fixture(tmp_path / "data")
  held = "00000797_000.png"
  os.rename(os.path.join(data, "images", held), tmp_path / held)
  out = str(tmp_path / "out")
  # A temporary file left by a killed run is cleared.
  stale = os.path.join(out, "cache", f"size{SIZE}", f".{held}.x.tmp")
  os.makedirs(os.path.dirname(stale))
  open(stale, "w").close()
  first = tfds_nih.prepare_nih(data, out, size=SIZE, split="paper",
                          balance="none", workers=1)
  assert not os.path.exists(stale)
  os.rename(tmp_path / held, os.path.join(data, "images", held))
  second = tfds_nih.prepare_nih(data, out, size=SIZE, split="paper",
                           balance="none", workers=1)
  assert second["tfds_rebuilt"] and second["cache"]["converted_now"] == 1
  n = lambda r: sum(sum(r["counts"]["dataset"][s].values())  # noqa: E731
                    for s in nih.SPLIT_NAMES)
  assert n(second) == n(first) + 1
  assert held in {_name(ex) for s in nih.SPLIT_NAMES
                  for ex in _read_split(second["tfds_dir"], s)}


def test_undersample_balances_train_only(tmp_path):
  report = tfds_nih.prepare_nih(FIXTURE, str(tmp_path / "out"), size=SIZE,
                           split="patient", seed=2, workers=1)
  counts = report["counts"]
  train = counts["dataset"]["train"]
  assert train["No Finding"] == train["Cardiomegaly"] == min(
      counts["present"]["train"].values())
  assert counts["dataset"]["test"] == counts["present"]["test"]
  assert report["class_weights"] == {c: 1.0 for c in records.CLASS_NAMES}
  assert counts["label_file_balanced_train"]["total"] == 2 * min(
      counts["label_file"]["train"].values())
  # Only what the dataset holds was decoded.
  assert report["cache"]["converted_now"] == (
      sum(train.values()) + sum(counts["dataset"]["test"].values()))


def test_cli_arguments(tmp_path, capsys):
  from agcg_jax import cli  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "out")
  assert cli.run(["prepare-nih", "--data-dir", FIXTURE, "--out", out, "--size", "32",
                  "--split", "official", "--workers", "1"]) == 0
  with open(os.path.join(out, "cohort.json")) as f:
    report = json.load(f)
  assert report["options"]["split"] == "official"
  assert report["config"] == "size32_both_official_undersample_seed0"
  assert "cohort.json" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.run(["prepare-nih", "--data-dir", FIXTURE, "--out", "x", "--views", "LL"])


def test_prepare_from_the_config_names_the_dataset_the_config_trains_on(tmp_path, capsys):
  """`agcg prepare --config` with data.nih options writes exactly the dataset that config opens."""
  from agcg_jax import cli  # pylint: disable=g-import-not-at-top
  from agcg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from agcg_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  overrides = ["--config.data.kind=nih", f"--config.data.dir={tmp_path / 'data'}",
               "--config.data.image_size=32", "--config.data.nih.split=official",
               "--config.data.nih.workers=1"]
  with pytest.raises(UserError, match="data.nih.source"):
    cli.run(["prepare", "--workdir", str(tmp_path / "run"), *overrides])
  assert cli.run(["prepare", "--workdir", str(tmp_path / "run"),
                  f"--config.data.nih.source={FIXTURE}", *overrides]) == 0
  config = config_lib.apply_overrides(config_lib.base(), [o[len("--config."):] for o in overrides])
  path = wd.dataset_dir(config, str(tmp_path / "run"))
  assert path.endswith(os.path.join("size32_both_official_undersample_seed0", "1.1.0"))
  # Another cohort option names another dataset: not prepared, and the error says what is there.
  other = config_lib.apply_overrides(config, ["data.nih.balance=none"])
  with pytest.raises(UserError, match="size32_both_official_undersample_seed0"):
    wd.dataset_dir(other, str(tmp_path / "run"))


def test_builder_alone(tmp_path):
  """The builder prepares from manual_dir by itself, as TFDS users expect."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from agcg_jax.data import tfds_nih  # pylint: disable=g-import-not-at-top
  config = tfds_nih.NihConfig.make(size=32, split="official", balance="none")
  builder = tfds_nih.NihChestXray14(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=FIXTURE))
  loaded = tfds.builder_from_directory(os.fspath(builder.data_dir))
  assert loaded.info.metadata["class_weights"].keys() == set(
      records.CLASS_NAMES)
  assert loaded.info.features["label"].names == list(records.CLASS_NAMES)
  sizes = {s: len(loaded.as_data_source(s)) for s in nih.SPLIT_NAMES}
  assert sum(sizes.values()) == len(FIXTURE_IMAGES)
  assert loaded.as_data_source("test")[0]["image"].shape == (32, 32, 1)


def test_default_options_build_through_the_cli(tmp_path):
  """All defaults (the builder's registered default config) through `agcg prepare-nih`."""
  from agcg_jax import cli
  out = str(tmp_path / "out")
  assert cli.run(["prepare-nih", "--data-dir", FIXTURE, "--out", out]) == 0
  with open(os.path.join(out, "cohort.json")) as f:
    cohort = json.load(f)
  assert cohort["options"]["split"] == "patient" and cohort["options"]["size"] == 256
  assert os.path.isfile(os.path.join(out, "nih_chest_xray14",
                                     "size256_both_patient_undersample_seed0", "1.1.0",
                                     "dataset_info.json"))


def test_cohort_controls_one_image_per_patient_and_age_sex_matching():
  plain = nih.build_cohort(FIXTURE, split="paper")
  one = nih.build_cohort(FIXTURE, split="paper", controls="one_per_patient")
  patients = [e.patient for e in one.entries]
  assert len(patients) == len(set(patients)) == len({e.patient for e in plain.entries})
  # A patient with a Cardiomegaly image keeps a Cardiomegaly image.
  cm_patients = {e.patient for e in plain.entries if e.label == 1}
  assert {e.patient for e in one.entries if e.label == 1} == cm_patients
  matched = nih.build_cohort(FIXTURE, split="paper", controls="match_age_sex")
  band = lambda e: (e.age // nih.AGE_BAND, e.sex)
  for key in {band(e) for e in matched.entries}:
    nf = sum(1 for e in matched.entries if band(e) == key and e.label == 0)
    cm = sum(1 for e in matched.entries if band(e) == key and e.label == 1)
    assert nf <= cm
  assert matched.controls["after"]["Cardiomegaly"] == matched.controls["before"]["Cardiomegaly"]
  assert all(e.sex in ("M", "F") for e in plain.entries)
  assert nih.config_name(64, "both", "paper", "none", 0, "equalize",
                         "match_age_sex,one_per_patient") == \
      "size64_both_paper_none_seed0_equalize_onepp_agesex"
  with pytest.raises(UserError, match="use any of"):
    nih.parse_controls("match_bmi")


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/nih_sample is absent")
def test_age_sex_matching_on_the_real_sample_removes_the_age_shift():
  plain = nih.build_cohort(SAMPLE, split="paper")
  matched = nih.build_cohort(SAMPLE, split="paper", controls="match_age_sex")
  gap = lambda es: abs(np.mean([e.age for e in es if e.label == 1 and e.age >= 0])
                       - np.mean([e.age for e in es if e.label == 0 and e.age >= 0]))
  assert gap(matched.entries) <= gap(plain.entries) + 1e-9
  assert gap(matched.entries) < 5.0
