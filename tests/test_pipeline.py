"""Tests of the phantom TFDS builder and the Grain pipelines, end to end."""
import os
import time

import numpy as np
import pytest

from agcg_jax.data import pipeline
from agcg_jax.data import records
from agcg_jax.data import tfds_phantoms
from agcg_jax.errors import UserError

SIZE, NUM_TRAIN, NUM_TEST = 32, 24, 8


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  # Built once through the real builder: ~0.5 s.
  root = tmp_path_factory.mktemp("phantoms")
  tfds_phantoms.prepare_phantoms(os.fspath(root), size=SIZE,
                                 num_train=NUM_TRAIN, num_test=NUM_TEST,
                                 seed=0)
  return os.fspath(root)


@pytest.fixture(scope="session")
def train(data_dir):
  return pipeline.open_source(data_dir, "train")


@pytest.fixture(scope="session")
def test_source(data_dir):
  return pipeline.open_source(data_dir, "test")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _keys(images):
  """Hashable identity of each image in a [B, S, S, 1] array."""
  return [im.tobytes() for im in images]


def _source_keys(source, indices=None):
  indices = range(len(source)) if indices is None else indices
  return [records.to_float(np.asarray(source[int(i)]["image"])).tobytes()
          for i in indices]


def test_prepare_is_a_fast_no_op_when_built(data_dir):
  info = os.path.join(pipeline.find_dataset_dir(data_dir), "dataset_info.json")
  mtime = os.path.getmtime(info)
  start = time.perf_counter()
  version_dir = tfds_phantoms.prepare_phantoms(
      data_dir, size=SIZE, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0)
  assert time.perf_counter() - start < 0.5
  assert version_dir == pipeline.find_dataset_dir(data_dir)
  assert os.path.getmtime(info) == mtime
  assert version_dir.endswith(os.path.join(
      "phantom_chest_xray", f"s{SIZE}_n{NUM_TRAIN}_t{NUM_TEST}_seed0",
      "1.2.0"))


def test_dataset_info(data_dir):
  info = pipeline.dataset_info(data_dir)
  assert info["name"] == "phantom_chest_xray"
  assert info["image_size"] == SIZE
  assert info["splits"] == {"train": NUM_TRAIN, "test": NUM_TEST}
  assert {"image", "label", "id", "heart_mask", "ctr", "heart_box",
          "thorax_box"} <= set(info["features"])


def test_records_hold_the_phantom_ground_truth(train):
  rec = train[0]
  assert rec["image"].shape == (SIZE, SIZE, 1)
  assert rec["image"].dtype == np.uint8
  assert rec["heart_mask"].shape == (SIZE, SIZE, 1)
  assert np.asarray(rec["heart_box"]).shape == (4,)
  assert (float(rec["ctr"]) > 0.5) == (int(rec["label"]) == 1)
  assert rec["id"].decode().startswith("phantom_train_")


def test_labels_balanced(train, test_source):
  labels = pipeline.labels_of(train)
  assert labels.shape == (NUM_TRAIN,)
  assert np.bincount(labels).tolist() == [NUM_TRAIN // 2, NUM_TRAIN // 2]
  assert np.bincount(pipeline.labels_of(test_source)).tolist() == [4, 4]


def test_classifier_batches_shapes_and_range(train):
  it = pipeline.classifier_batches(train, batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, SIZE, SIZE, 1)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["image"].min() < -0.5 and batch["image"].max() > 0.0
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
  assert set(batch["label"].tolist()) <= {0, 1}


def test_classifier_epochs_are_reshuffled_permutations(train):
  it = pipeline.classifier_batches(train, batch_size=4, seed=3)
  per_epoch = NUM_TRAIN // 4
  epochs = [np.concatenate([b["image"] for b in _take(it, per_epoch)])
            for _ in range(2)]
  everything = sorted(_source_keys(train))
  for images in epochs:
    assert sorted(_keys(images)) == everything
  assert _keys(epochs[0]) != _keys(epochs[1])
  other = pipeline.classifier_batches(train, batch_size=4, seed=4)
  assert _keys(next(other)["image"]) != _keys(epochs[0][:4])


def test_classifier_resume_matches_uninterrupted(train):
  it = pipeline.classifier_batches(train, batch_size=4, seed=1)
  _take(it, 4)
  state = it.get_state()
  # The next batches cross the epoch boundary (6 batches an epoch).
  expected = _take(it, 5)
  fresh = pipeline.classifier_batches(train, batch_size=4, seed=1)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 5)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


def test_classifier_shards_are_disjoint_and_cover(train):
  seen = []
  for shard in range(2):
    it = pipeline.classifier_batches(train, batch_size=4, seed=0,
                                     shard_index=shard, shard_count=2)
    # One epoch of 24 records is 3 global batches of 2 x 4.
    seen.append(_keys(np.concatenate([b["image"] for b in _take(it, 3)])))
  assert len(set(seen[0])) == len(set(seen[1])) == NUM_TRAIN // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(_source_keys(train))


def test_global_batches_do_not_depend_on_the_process_count(train):
  """2 processes x B=4 read exactly the global batches 1 process x B=8 reads."""
  one = pipeline.classifier_batches(train, batch_size=8, seed=5)
  two = [pipeline.classifier_batches(train, batch_size=4, seed=5, shard_index=k,
                                     shard_count=2) for k in range(2)]
  for _ in range(4):  # crosses an epoch boundary (3 global batches an epoch)
    whole = next(one)
    parts = [next(it) for it in two]
    np.testing.assert_array_equal(whole["image"], np.concatenate([p["image"] for p in parts]))
  gan_one = pipeline.gan_batches(train, batch_size=4, seed=5)
  gan_two = [pipeline.gan_batches(train, batch_size=2, seed=5, shard_index=k, shard_count=2)
             for k in range(2)]
  for _ in range(4):
    whole = next(gan_one)
    parts = [next(it) for it in gan_two]
    for d in records.CLASS_KEYS:
      np.testing.assert_array_equal(whole[d], np.concatenate([p[d] for p in parts]))


def test_classifier_class_weights(train):
  it = pipeline.classifier_batches(train, batch_size=8, seed=0,
                                   class_weights={"No Finding": 0.5,
                                                  "Cardiomegaly": 2.0})
  batch = next(it)
  np.testing.assert_array_equal(batch["weight"],
                                np.where(batch["label"] == 1, 2.0, 0.5))
  with pytest.raises(UserError, match="class_weights"):
    pipeline.classifier_batches(train, batch_size=8, seed=0,
                                class_weights={"Edema": 1.0})


def test_gan_batches_are_unpaired_domains(train):
  labels = pipeline.labels_of(train)
  it = pipeline.gan_batches(train, batch_size=3, seed=0)
  domain_keys = {d: set(_source_keys(train, np.flatnonzero(labels == i)))
                 for i, d in enumerate(records.CLASS_KEYS)}
  # 8 batches of 3 = two epochs of each 12-image domain.
  batches = _take(it, 8)
  for d in records.CLASS_KEYS:
    images = np.concatenate([b[d] for b in batches])
    assert images.shape == (24, SIZE, SIZE, 1)
    assert images.dtype == np.float32 and images.min() >= -1.0
    keys = _keys(images)
    assert set(keys) == domain_keys[d]
    # Each domain epoch is a permutation, and the next one is reshuffled.
    assert sorted(keys[:12]) == sorted(keys[12:]) and keys[:12] != keys[12:]


def test_gan_resume_matches_uninterrupted(train):
  it = pipeline.gan_batches(train, batch_size=5, seed=2)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = pipeline.gan_batches(train, batch_size=5, seed=2)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 4)):
    for d in records.CLASS_KEYS:
      np.testing.assert_array_equal(want[d], got[d])


def test_gan_shards_are_disjoint(train):
  seen = []
  for shard in range(2):
    it = pipeline.gan_batches(train, batch_size=2, seed=0, shard_index=shard,
                              shard_count=2)
    batches = _take(it, 3)  # One epoch: 3 global batches of 2 x 2 per domain.
    seen.append({d: set(_keys(np.concatenate([b[d] for b in batches])))
                 for d in records.CLASS_KEYS})
  for d in records.CLASS_KEYS:
    assert len(seen[0][d]) == len(seen[1][d]) == 6
    assert not seen[0][d] & seen[1][d]


def test_eval_batches_cover_each_example_once(test_source):
  batches = list(pipeline.eval_batches(test_source, batch_size=5))
  assert len(batches) == 2
  for b in batches:
    assert b["image"].shape == (5, SIZE, SIZE, 1)
    assert b["image"].dtype == np.float32
    assert b["valid"].dtype == np.bool_ and b["index"].dtype == np.int32
    assert b["heart_box"].shape == (5, 4) and b["ctr"].shape == (5,)
    assert b["heart_mask"].shape == (5, SIZE, SIZE, 1)
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * NUM_TEST + [False] * 2
  assert index[valid].tolist() == list(range(NUM_TEST))
  assert np.all(index[~valid] == -1)
  # Fields belong to the record at `index`.
  last = batches[1]
  rec = test_source[int(last["index"][2])]
  assert last["id"][2] == rec["id"].decode()
  assert last["label"][2] == rec["label"]
  np.testing.assert_array_equal(last["image"][2],
                                records.to_float(rec["image"]))
  assert np.all(last["image"][~last["valid"]] == 0)


def test_eval_shards_cover_once_in_lockstep(test_source):
  counts = []
  seen = []
  for shard in range(3):
    batches = list(pipeline.eval_batches(test_source, batch_size=2,
                                         shard_index=shard, shard_count=3))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 2
      seen += b["index"][b["valid"]].tolist()
  assert counts == [2, 2, 2]
  assert sorted(seen) == list(range(NUM_TEST))


def test_missing_dataset_is_a_user_error(tmp_path):
  missing = os.fspath(tmp_path / "nowhere")
  with pytest.raises(UserError, match="nowhere"):
    pipeline.find_dataset_dir(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match="prepare-phantoms"):
    pipeline.open_source(os.fspath(empty), "train")


def test_unknown_split_is_a_user_error(data_dir):
  with pytest.raises(UserError, match="validation"):
    pipeline.open_source(data_dir, "validation")


def test_several_datasets_is_a_user_error(tmp_path):
  for config in ("a", "b"):
    version = tmp_path / "x" / config / "1.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
  with pytest.raises(UserError, match="several"):
    pipeline.find_dataset_dir(os.fspath(tmp_path))
