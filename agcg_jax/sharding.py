"""Mesh and shardings: data parallel over every device of every process."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agcg_jax.errors import UserError

DATA = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def global_batch_size(per_device: int, global_batch: int, mesh: Mesh, option: str) -> int:
  """The global batch: per-device batch x device count, or an explicit global batch.

  An explicit global batch must split evenly over the devices.
  """
  n = mesh.devices.size
  if global_batch and global_batch > 0:
    if global_batch % n:
      raise UserError(f"{option}.global_batch={global_batch} is not divisible by the "
                      f"{n} devices; use a multiple of {n} or set {option}.batch_per_device")
    return global_batch
  if per_device < 1:
    raise UserError(f"{option}.batch_per_device must be >= 1, got {per_device}")
  return per_device * n


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded along 'data'.

  Each process passes its own slice; `make_array_from_process_local_data`
  stitches the global array (one process: just a device_put).
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
