"""Tests of the input benchmark and the device prefetch helper."""
import os

import jax
import numpy as np
import pytest

from agcg_jax import input_bench
from agcg_jax import sharding as sh
from agcg_jax.data import pipeline
from agcg_jax.data import tfds_phantoms

SIZE, NUM_TRAIN, NUM_TEST, BATCH = 32, 24, 8, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = os.fspath(tmp_path_factory.mktemp("phantoms"))
  tfds_phantoms.prepare_phantoms(root, size=SIZE, num_train=NUM_TRAIN,
                                 num_test=NUM_TEST, seed=0)
  return root


@pytest.fixture(scope="module")
def source(data_dir):
  return pipeline.open_source(data_dir, "train")


def _gan(source, seed=3):
  return pipeline.gan_batches(source, batch_size=BATCH, seed=seed)


def _assert_same(host_batch, device_batch):
  assert host_batch.keys() == device_batch.keys()
  for key, value in host_batch.items():
    assert isinstance(device_batch[key], jax.Array)
    np.testing.assert_array_equal(np.asarray(device_batch[key]), value)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_prefetch_yields_the_same_batches_in_the_same_order(source, size):
  plain = [next(it) for it in [_gan(source)] for _ in range(7)]
  fetched = sh.prefetch_to_device(_gan(source), size=size)
  for want in plain:
    _assert_same(want, next(fetched))
  fetched.close()


def test_prefetch_onto_a_sharded_mesh(source):
  mesh = sh.data_mesh(jax.devices()[:2])
  sharding = sh.batch_sharded(mesh)
  plain = _gan(source)
  fetched = sh.prefetch_to_device(_gan(source), sharding=sharding)
  for _ in range(3):
    want, got = next(plain), next(fetched)
    _assert_same(want, got)
    assert all(v.sharding == sharding for v in got.values())
  fetched.close()


def test_prefetch_state_is_the_consumers_position(source):
  fetched = sh.prefetch_to_device(_gan(source), size=3)
  assert fetched.get_state() is None
  for _ in range(4):
    next(fetched)
  # The wrapped iterator is 3 batches ahead; the state is where we are.
  resumed = _gan(source)
  resumed.set_state(fetched.get_state())
  for _ in range(3):
    _assert_same(next(resumed), next(fetched))
  fetched.close()


def test_prefetch_of_a_finite_plain_iterator():
  batches = [{"x": np.full((2, 3), i, np.float32), "id": np.array(["a", "b"])}
             for i in range(5)]
  fetched = sh.prefetch_to_device(iter(batches), size=2)
  got = list(fetched)
  assert len(got) == 5
  for want, have in zip(batches, got):
    np.testing.assert_array_equal(np.asarray(have["x"]), want["x"])
    assert isinstance(have["x"], jax.Array)
    assert isinstance(have["id"], np.ndarray)  # text stays on the host
  assert fetched.get_state() is None  # no state to report
  with pytest.raises(ValueError, match="size 0"):
    sh.prefetch_to_device(iter(batches), size=0)


@pytest.mark.parametrize("kind,prefetch,per_batch", [
    ("gan", True, 2 * BATCH), ("gan", False, 2 * BATCH), ("classifier", True, BATCH)])
def test_input_throughput_reports_a_positive_rate(data_dir, kind, prefetch, per_batch):
  row = input_bench.input_throughput(data_dir, split="train", kind=kind, batch_size=BATCH,
                                     worker_count=0, batches=5, warmup=1,
                                     prefetch_to_device=prefetch)
  assert set(row) == {"kind", "split", "image_size", "batch_size", "worker_count",
                      "prefetch", "batches", "images", "seconds", "images_per_s",
                      "batches_per_s", "startup_s", "device"}
  assert row["kind"] == kind and row["image_size"] == SIZE
  assert row["batches"] == 5 and row["images"] == 5 * per_batch
  assert row["prefetch"] == (2 if prefetch else 0)
  assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["batches_per_s"] > 0
  assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"], rel=0.01)


def test_input_throughput_for_a_time(data_dir):
  row = input_bench.input_throughput(data_dir, batch_size=BATCH, seconds=0.2, warmup=0)
  assert row["seconds"] >= 0.2 and row["batches"] >= 1 and row["images_per_s"] > 0


def test_input_throughput_needs_a_length_and_a_known_kind(data_dir):
  with pytest.raises(ValueError, match="seconds or batches"):
    input_bench.input_throughput(data_dir, seconds=None, batches=None)
  with pytest.raises(ValueError, match="kind"):
    input_bench.input_throughput(data_dir, kind="eval", batches=1)


@pytest.mark.slow
def test_input_throughput_with_a_worker_process(data_dir):
  row = input_bench.input_throughput(data_dir, batch_size=BATCH, worker_count=1,
                                     batches=3, warmup=1)
  assert row["worker_count"] == 1 and row["images"] == 3 * 2 * BATCH
