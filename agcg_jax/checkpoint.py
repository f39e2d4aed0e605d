"""Orbax checkpoints: the train state and the data iterator's state, saved together.

Saves are asynchronous (training continues while the files are written) and
atomic (Orbax writes to a temporary directory and renames it when complete),
so a killed run resumes from its last *complete* checkpoint. Nothing is
loaded with pickle: arrays come back through the abstract target, the
iterator state as JSON.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager in `directory` keeping the last `keep` checkpoints."""

  def __init__(self, directory: str, keep: int, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      args["data"] = ocp.args.JsonSave(data_state)
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, with_data: bool = True):
    """Restores (state, data_state) at `step` into the structure/shardings of `abstract_state`."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and "data" in self._item_names(step):
      args["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], (restored["data"] if "data" in args else None)

  def _item_names(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    return set(os.listdir(path)) if os.path.isdir(path) else set()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_state, sharding) -> Any:
  """jax.ShapeDtypeStruct leaves carrying `sharding`, the target for a sharded restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state)
