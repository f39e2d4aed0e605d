"""Test session setup: 8 fake CPU devices (set before jax is imported anywhere).

Tests that want one device pass an explicit one-device mesh; the sharding
tests compare the two.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU compiler dominates this suite's time; its heavy optimisations buy
# little on these tiny networks (measured: compile 15 s -> 8 s, same step
# time).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The persistent cache lets tests (and the CLI subprocesses they start) that
# compile the same program share it; a cache made here is removed when the
# session ends (~20 MB each).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="agcg-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def root():
  return ROOT


@pytest.fixture(scope="session")
def one_device_mesh():
  from agcg_jax import sharding
  return sharding.data_mesh(jax.devices()[:1])


@pytest.fixture(scope="session")
def tiny_config():
  from agcg_jax import config as config_lib
  return config_lib.load_config(os.path.join(ROOT, "configs", "demo.py") + ":tiny")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_config):
  """The tiny config's phantom dataset, prepared once per test process."""
  from agcg_jax.data import tfds_phantoms
  d = str(tmp_path_factory.mktemp("tiny_data"))
  c = tiny_config.data
  tfds_phantoms.prepare_phantoms(d, size=c.image_size, num_train=c.num_train,
                                 num_test=c.num_test, seed=0)
  return d
