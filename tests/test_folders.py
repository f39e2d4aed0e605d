"""Tests of class-folder datasets: scanning, class maps, splits, conversion, TFDS.

Trees of real radiographs are built in tmp_path from the committed NIH
fixture (tests/fixtures/nih/images: 8 Cardiomegaly, 6 No Finding, 128 px),
so these run without ../shared. Those marked `needs_cm128` also use
../shared/nih_cm128 (the class-folder copy of NIH images the issue trains
on) and are skipped without it.
"""
import csv
import importlib
import json
import os
import shutil

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from agcg_jax.data import folders
from agcg_jax.data import images
from agcg_jax.data import pipeline
from agcg_jax.data import records
from agcg_jax.data import tfds_folders
from agcg_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nih")
CM128 = os.path.normpath(os.path.join(ROOT, "..", "shared", "nih_cm128"))
CM128_MAP = {"No Finding": ["false"], "Cardiomegaly": ["true"]}
needs_cm128 = pytest.mark.skipif(
    not os.path.isdir(os.path.join(CM128, "true")),
    reason=f"../shared/nih_cm128 is not at {CM128}")
SIZE = 32


def _fixture_classes() -> dict[int, list[str]]:
  """{label: [fixture image paths]} from the fixture's label file."""
  present = set(os.listdir(os.path.join(FIXTURE, "images")))
  out = {0: [], 1: []}
  with open(os.path.join(FIXTURE, "Data_Entry_2017_v2020.csv")) as f:
    for row in csv.DictReader(f):
      name = row["Image Index"]
      if name in present:
        findings = row["Finding Labels"].split("|")
        label = 1 if "Cardiomegaly" in findings else 0
        assert label or findings == ["No Finding"]
        out[label].append(os.path.join(FIXTURE, "images", name))
  assert len(out[0]) == 6 and len(out[1]) == 8
  return {k: sorted(v) for k, v in out.items()}


def _tree(root, layout: dict[str, list[str]]) -> str:
  """Copies files into `root/<folder>/`; returns root."""
  for folder, paths in layout.items():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for p in paths:
      shutil.copy(p, os.path.join(root, folder, os.path.basename(p)))
  return str(root)


@pytest.fixture(scope="module")
def classes():
  return _fixture_classes()


@pytest.fixture
def class_tree(tmp_path, classes):
  """root/normal/ (6), root/cardiomegaly/ (7 + 1 in a sub-folder), README."""
  root = _tree(tmp_path / "root", {"normal": classes[0],
                                   "cardiomegaly": classes[1][:7],
                                   "cardiomegaly/more": classes[1][7:]})
  with open(os.path.join(root, "README.txt"), "w") as f:
    f.write("not an image\n")
  with open(os.path.join(root, "normal", ".DS_Store"), "w") as f:
    f.write("hidden\n")
  return root


def _read(data_dir, split):
  source = pipeline.open_source(data_dir, split)
  return [source[i] for i in range(len(source))]


def _id(rec):
  return rec["id"].decode() if isinstance(rec["id"], bytes) else rec["id"]


# --- layouts -------------------------------------------------------------------


def test_class_folders_prepared_and_read_back(tmp_path, class_tree):
  out = str(tmp_path / "out")
  version_dir = tfds_folders.prepare_folders(
      class_tree, out, size=SIZE, test_fraction=0.25, seed=0, workers=1)
  assert version_dir.endswith(os.path.join(
      "class_folder_xray", "size32_none_test25_seed0", "1.0.0"))
  info = pipeline.dataset_info(out)
  assert info["name"] == "class_folder_xray" and info["image_size"] == SIZE
  assert set(info["features"]) == {"image", "label", "id"}
  # Stratified: ceil(6 / 4) No Finding and ceil(8 / 4) Cardiomegaly in test.
  assert info["splits"] == {"train": 10, "test": 4}
  seen = {}
  for split in folders.SPLIT_NAMES:
    counts = {c: 0 for c in records.CLASS_NAMES}
    for rec in _read(out, split):
      rid = _id(rec)
      seen[rid] = split
      folder = rid.split("/")[0]
      assert rec["label"] == {"normal": 0, "cardiomegaly": 1}[folder]
      assert rec["image"].shape == (SIZE, SIZE, 1)
      assert rec["image"].dtype == np.uint8
      expected, _, _ = images.load_image(os.path.join(class_tree, rid), SIZE)
      np.testing.assert_array_equal(rec["image"][..., 0], expected)
      counts[records.CLASS_NAMES[rec["label"]]] += 1
    assert counts == {"No Finding": 3 if split == "train" else 2,
                      "Cardiomegaly": 6 if split == "train" else 2
                      } or split == "train"
  assert len(seen) == 14
  assert "cardiomegaly/more/" + os.path.basename(
      _fixture_classes()[1][7]) in seen
  with open(os.path.join(out, "cohort.json")) as f:
    report = json.load(f)
  assert report["counts"]["dataset"]["test"] == {"No Finding": 2,
                                                 "Cardiomegaly": 2}
  assert report["counts"]["dataset"]["train"] == {"No Finding": 4,
                                                  "Cardiomegaly": 6}
  assert report["layout"] == "class_folders"
  assert report["folders"] == {"cardiomegaly": "Cardiomegaly",
                               "normal": "No Finding"}
  assert report["other_files"] == 1  # README.txt; hidden files not counted
  assert report["skipped"] == {"count": 0, "by_reason": {}, "files": []}
  assert report["tfds_dir"] == version_dir


def test_eval_batches_over_a_folder_dataset(tmp_path, class_tree):
  out = str(tmp_path / "out")
  tfds_folders.prepare_folders(class_tree, out, size=SIZE, workers=1)
  source = pipeline.open_source(out, "test")
  batches = list(pipeline.eval_batches(source, batch_size=3))
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(source) and len(valid) % 3 == 0
  first = batches[0]
  assert first["image"].shape == (3, SIZE, SIZE, 1)
  assert first["image"].dtype == np.float32
  assert -1.0 <= first["image"].min() and first["image"].max() <= 1.0
  assert first["label"].dtype == np.int32
  ids = [i for b in batches for i, v in zip(b["id"], b["valid"]) if v]
  assert ids == [_id(source[i]) for i in range(len(source))]


def test_split_folders_layout(tmp_path, classes):
  root = _tree(tmp_path / "root", {
      "train/normal": classes[0][:4], "train/Cardiomegaly": classes[1][:5],
      "Test/NORMAL": classes[0][4:], "Test/cardiomegaly": classes[1][5:],
      "val/normal": classes[0][:1]})
  with pytest.raises(UserError, match="val.*neither a split folder nor "
                     "ignored"):
    tfds_folders.prepare_folders(root, str(tmp_path / "out"), size=SIZE,
                                 workers=1)
  out = str(tmp_path / "out")
  version_dir = tfds_folders.prepare_folders(root, out, size=SIZE,
                                             ignore=["val"], workers=1)
  assert version_dir.endswith(os.path.join("size32_none_splitfolders",
                                           "1.0.0"))
  for split, want in (("train", 9), ("test", 5)):
    recs = _read(out, split)
    assert len(recs) == want
    assert all(_id(r).lower().startswith(split + "/") for r in recs)
  with open(os.path.join(out, "cohort.json")) as f:
    report = json.load(f)
  assert report["ignored_folders"] == ["val"]
  assert report["counts"]["dataset"]["test"] == {"No Finding": 2,
                                                 "Cardiomegaly": 3}


def test_split_layout_needs_both_splits(tmp_path, classes):
  root = _tree(tmp_path / "root", {"train/normal": classes[0][:2],
                                   "train/cardiomegaly": classes[1][:2]})
  with pytest.raises(UserError, match="train/ folder but no test/"):
    folders.scan_folders(root)


# --- the split -----------------------------------------------------------------


def test_split_is_stratified_seeded_and_deterministic():
  ids = [(f"a/{i:03d}.png", 0) for i in range(53)] + [
      (f"b/{i:03d}.png", 1) for i in range(21)]
  split = folders.split_by_class(ids, seed=0, test_fraction=0.2)
  assert split == folders.split_by_class(list(reversed(ids)), seed=0,
                                         test_fraction=0.2)
  for label, n in ((0, 53), (1, 21)):
    tests = sum(split[i] == "test" for i, l in ids if l == label)
    assert tests == -(-n // 5)
  other = folders.split_by_class(ids, seed=1, test_fraction=0.2)
  assert other != split
  # 0.2 * 15 is 3.0000000000000004 in floats; the test share is still 3.
  ids15 = [(f"{i}", 0) for i in range(15)]
  assert sum(v == "test" for v in folders.split_by_class(
      ids15, seed=0, test_fraction=0.2).values()) == 3


def test_rerun_is_a_no_op_and_a_changed_tree_rebuilds(tmp_path, class_tree,
                                                      classes):
  out = str(tmp_path / "out")
  first = tfds_folders.prepare_folders(class_tree, out, size=SIZE, workers=1)
  info = os.path.join(first, "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  assert tfds_folders.prepare_folders(class_tree, out, size=SIZE,
                                      workers=1) == first
  assert os.stat(info).st_mtime_ns == stamp
  os.remove(os.path.join(class_tree, "normal",
                         os.path.basename(classes[0][0])))
  assert tfds_folders.prepare_folders(class_tree, out, size=SIZE,
                                      workers=1) == first
  assert pipeline.dataset_info(out)["splits"] == {"train": 10, "test": 3}
  assert not [n for n in os.listdir(out) if n.endswith(".npy")]


# --- class maps ------------------------------------------------------------------


def test_class_map_forms():
  assert folders.resolve_class_map(
      {"No Finding": ["Normal", "healthy"], "cardiomegaly": "CM"}) == {
          "normal": 0, "healthy": 0, "cm": 1}
  assert folders.resolve_class_map({0: "a", 1: ["b"]}) == {"a": 0, "b": 1}
  assert folders.resolve_class_map(None) == {
      "no_finding": 0, "no finding": 0, "normal": 0, "cardiomegaly": 1}


@pytest.mark.parametrize("class_map, ignore, match", [
    ({"Effusion": ["x"], "Cardiomegaly": ["y"]}, (), "class map key 'Effusion'"),
    ({"No Finding": ["x"], "Cardiomegaly": ["y"], 0: ["z"]}, (),
     "given twice"),
    ({"No Finding": ["x"], "Cardiomegaly": ["X"]}, (),
     "folder 'X' is given to both"),
    ({"No Finding": ["x"], "Cardiomegaly": ["y"]}, ("Y",),
     "both mapped and ignored"),
    ({"No Finding": ["x"]}, (), "names no folder for 'Cardiomegaly'"),
    ({"No Finding": [], "Cardiomegaly": ["y"]}, (), "not a list of folder"),
    (["normal"], (), "expected {class: \\[folder names\\]}"),
])
def test_class_map_errors(class_map, ignore, match):
  with pytest.raises(UserError, match=match):
    folders.resolve_class_map(class_map, ignore)


def test_unmapped_folder_is_an_error_naming_it_unless_ignored(tmp_path,
                                                             class_tree,
                                                             classes):
  _tree(class_tree, {"effusion": classes[0][:1]})
  with pytest.raises(UserError) as info:
    folders.scan_folders(class_tree)
  message = str(info.value)
  assert os.path.join(class_tree, "effusion") in message
  assert "not in the class map" in message and "\n" not in message
  scan = folders.scan_folders(class_tree, ignore=["Effusion"])
  assert scan.ignored == ["effusion"]
  assert scan.counts()["all"] == {"No Finding": 6, "Cardiomegaly": 8}


def test_missing_root_and_empty_root(tmp_path):
  with pytest.raises(UserError, match="is not a folder"):
    folders.scan_folders(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="no class folders"):
    folders.scan_folders(str(tmp_path / "empty"))


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 4}, "--size"), ({"test_fraction": 1.0}, "--test-fraction"),
    ({"test_fraction": 0}, "--test-fraction"), ({"seed": -1}, "--seed"),
    ({"normalize": "gamma"}, "normalize must be one of"),
    ({"workers": 0}, "--workers")])
def test_bad_options(tmp_path, class_tree, kwargs, match):
  with pytest.raises(UserError, match=match):
    tfds_folders.prepare_folders(class_tree, str(tmp_path / "out"), **kwargs)


def test_too_few_images_for_a_split(tmp_path, classes):
  root = _tree(tmp_path / "root", {"normal": classes[0][:1],
                                   "cardiomegaly": classes[1][:3]})
  with pytest.raises(UserError, match="training needs both classes"):
    tfds_folders.prepare_folders(root, str(tmp_path / "out"), size=SIZE,
                                 workers=1)


# --- bad images -------------------------------------------------------------------


def test_bad_images_fatal_or_skipped_and_counted(tmp_path, class_tree,
                                                 classes):
  bad = os.path.join(class_tree, "normal", os.path.basename(classes[0][1]))
  with open(bad, "rb") as f:
    head = f.read()[: os.path.getsize(bad) // 2]
  with open(bad, "wb") as f:
    f.write(head)
  empty = os.path.join(class_tree, "cardiomegaly", "empty.png")
  open(empty, "wb").close()
  with pytest.raises(UserError) as info:
    tfds_folders.prepare_folders(class_tree, str(tmp_path / "strict"),
                                 size=SIZE, workers=1)
  message = str(info.value)
  assert message.startswith(empty) or message.startswith(bad)
  assert "\n" not in message
  out = str(tmp_path / "out")
  tfds_folders.prepare_folders(class_tree, out, size=SIZE, strict=False,
                               workers=1)
  with open(os.path.join(out, "cohort.json")) as f:
    report = json.load(f)
  assert report["skipped"]["count"] == 2
  assert report["skipped"]["by_reason"] == {"empty_file": 1, "unreadable": 1}
  assert {s["file"] for s in report["skipped"]["files"]} == {bad, empty}
  assert report["counts"]["found"]["all"] == {"No Finding": 6,
                                              "Cardiomegaly": 9}
  assert report["counts"]["dataset"]["all"] == {"No Finding": 5,
                                                "Cardiomegaly": 8}


# --- intensity normalisation ------------------------------------------------------


def _flatness(image_u8):
  """Largest gap between the image's grey-level CDF and a uniform one."""
  cdf = np.cumsum(np.bincount(image_u8.ravel(), minlength=256)) / image_u8.size
  return np.abs(cdf - np.arange(1, 257) / 256).max()


def test_equalize_flattens_the_histogram(tmp_path, class_tree):
  plain, flat = str(tmp_path / "plain"), str(tmp_path / "flat")
  tfds_folders.prepare_folders(class_tree, plain, size=64, workers=1)
  version_dir = tfds_folders.prepare_folders(class_tree, flat, size=64,
                                             normalize="equalize", workers=1)
  assert "size64_equalize_test20_seed0" in version_dir
  assert pipeline.dataset_info(flat)["metadata"]["normalize"] == "equalize"
  before = {_id(r): r["image"][..., 0] for r in _read(plain, "train")}
  after = {_id(r): r["image"][..., 0] for r in _read(flat, "train")}
  assert before.keys() == after.keys()
  for key, image in before.items():
    # Equalised at the stored size, by Pillow.
    np.testing.assert_array_equal(
        after[key], np.asarray(ImageOps.equalize(Image.fromarray(image))))
    assert not np.array_equal(after[key], image)
    assert _flatness(after[key]) < _flatness(image)


def test_clahe_needs_scikit_image():
  image = np.tile(np.arange(64, dtype=np.uint8)[None], (64, 1)) * 2
  try:
    importlib.import_module("skimage.exposure")
  except ImportError:
    with pytest.raises(UserError, match="pip install scikit-image"):
      images.normalize_image(image, "clahe")
    with pytest.raises(UserError, match="pip install scikit-image"):
      folders.check_options(64, 0, 0.2, "clahe", None)
    return
  out = images.normalize_image(image, "clahe")
  assert out.dtype == np.uint8 and out.shape == image.shape


# --- conversion on several processes ------------------------------------------------


def test_workers_give_the_same_dataset(tmp_path, classes, monkeypatch):
  # 70 images, the pool started whatever they cost (32 are converted here
  # first, 38 in the pool).
  monkeypatch.setattr(folders, "_POOL_AFTER_S", 0.0)
  layout = {"normal": [], "cardiomegaly": []}
  src = tmp_path / "src"
  os.makedirs(src)
  for k in range(5):
    for label, folder in ((0, "normal"), (1, "cardiomegaly")):
      for p in classes[label]:
        copy = src / f"{k}_{os.path.basename(p)}"
        shutil.copy(p, copy)
        layout[folder].append(str(copy))
  root = _tree(tmp_path / "root", layout)
  one = tfds_folders.prepare_folders(root, str(tmp_path / "one"), size=SIZE,
                                     workers=1)
  two = tfds_folders.prepare_folders(root, str(tmp_path / "two"), size=SIZE,
                                     workers=2)
  for split in folders.SPLIT_NAMES:
    a = {_id(r): r["image"] for r in _read(one, split)}
    b = {_id(r): r["image"] for r in _read(two, split)}
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# --- ../shared/nih_cm128, as it is ------------------------------------------------


@needs_cm128
def test_nih_cm128_scans_as_it_is():
  scan = folders.scan_folders(CM128, CM128_MAP)
  assert scan.layout == "class_folders"
  assert scan.counts()["all"] == {"No Finding": 2213, "Cardiomegaly": 2058}
  assert scan.other_files >= 1  # its README
  with pytest.raises(UserError, match="not in the class map"):
    folders.scan_folders(CM128)  # "true" / "false" need the map


@needs_cm128
def test_nih_cm128_subset_prepared_and_read(tmp_path):
  root = tmp_path / "cm128"
  for folder in ("true", "false"):
    os.makedirs(root / folder)
    for name in sorted(os.listdir(os.path.join(CM128, folder)))[:10]:
      os.symlink(os.path.join(CM128, folder, name), root / folder / name)
  out = str(tmp_path / "out")
  tfds_folders.prepare_folders(str(root), out, size=SIZE, class_map=CM128_MAP,
                               normalize="equalize", workers=1)
  source = pipeline.open_source(out, "train")
  assert len(source) == 16
  labels = pipeline.labels_of(source)
  assert np.bincount(labels).tolist() == [8, 8]
  batch = next(iter(pipeline.eval_batches(source, batch_size=16)))
  for rid, label in zip(batch["id"], batch["label"]):
    assert label == (1 if str(rid).startswith("true/") else 0)


def test_builder_alone(tmp_path, class_tree):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_folders.ClassFolderXray(
      config=tfds_folders.FolderConfig.make(size=SIZE),
      data_dir=str(tmp_path / "out"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=class_tree))
  source = tfds.builder_from_directory(os.fspath(builder.data_dir)
                                       ).as_data_source("test")
  assert len(source) == 4 and source[0]["image"].shape == (SIZE, SIZE, 1)
