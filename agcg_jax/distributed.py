"""JAX's own multi-process runtime, started only when the launch script asks for it.

AGCG_DISTRIBUTED=1 (or `agcg --distributed`) calls jax.distributed.initialize().
On Cloud TPU VMs it needs no arguments; on GPU hosts the launch script sets
AGCG_COORDINATOR (host:port of process 0), AGCG_NUM_PROCESSES and
AGCG_PROCESS_ID. On the CPU (tests, two processes on one machine) the gloo
collectives are used.
"""
import os
import socket
import time

import jax

from agcg_jax.errors import UserError

_started = False


def requested() -> bool:
  return os.environ.get("AGCG_DISTRIBUTED", "0").lower() in ("1", "true", "yes")


def initialize(timeout_s: int | None = None) -> None:
  """Starts the multi-process runtime (idempotent); errors are one line."""
  global _started
  if _started:
    return
  coordinator = os.environ.get("AGCG_COORDINATOR") or None
  num = os.environ.get("AGCG_NUM_PROCESSES")
  pid = os.environ.get("AGCG_PROCESS_ID")
  timeout_s = timeout_s or int(os.environ.get("AGCG_INIT_TIMEOUT", "300"))
  kwargs = {}
  if coordinator:
    if num is None or pid is None:
      raise UserError("AGCG_COORDINATOR is set but AGCG_NUM_PROCESSES or AGCG_PROCESS_ID is not")
    try:
      num_i, pid_i = int(num), int(pid)
    except ValueError:
      raise UserError(f"AGCG_NUM_PROCESSES={num!r} and AGCG_PROCESS_ID={pid!r} must be integers") from None
    if not 0 <= pid_i < num_i:
      raise UserError(f"AGCG_PROCESS_ID={pid_i} is not in [0, AGCG_NUM_PROCESSES={num_i})")
    kwargs = dict(coordinator_address=coordinator, num_processes=num_i, process_id=pid_i)
  if coordinator and int(pid) != 0:
    _wait_for_coordinator(coordinator, timeout_s)
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or (
      coordinator and coordinator.startswith(("127.", "localhost"))):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as e:  # JAX raises a variety of runtime errors here.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f"coordinator {coordinator}" if coordinator else "the auto-detected coordinator"
    raise UserError(f"could not start the multi-process runtime with {where} "
                    f"(waited up to {timeout_s} s): {msg[:300]}") from e
  if coordinator and jax.process_count() != int(num):
    raise UserError(f"AGCG_NUM_PROCESSES={num} but the runtime sees {jax.process_count()} processes")
  _started = True


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  """Waits (bounded) until the coordinator's port accepts connections.

  JAX's client aborts the whole process (a C++ fatal error, no Python
  exception) when the coordinator never answers; checking first turns that
  into a one-line error.
  """
  host, _, port = address.rpartition(":")
  try:
    port_i = int(port)
  except ValueError:
    raise UserError(f"AGCG_COORDINATOR={address!r}: expected HOST:PORT") from None
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), port_i), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f"could not start the multi-process runtime: coordinator {address} "
                        f"not reachable after {timeout_s} s ({e.strerror or e})") from None
      time.sleep(0.5)
