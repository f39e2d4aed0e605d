"""JAX's own multi-process runtime, started only when the launch script asks for it.

AGCG_DISTRIBUTED=1 (or `agcg --distributed`) calls jax.distributed.initialize().
On Cloud TPU VMs it needs no arguments; on GPU hosts the launch script sets
AGCG_COORDINATOR (host:port of process 0; port + 1 must be free too, for a
bounded pre-check that all processes are there), AGCG_NUM_PROCESSES and
AGCG_PROCESS_ID. On the CPU (tests, two processes on one machine) the gloo
collectives are used.
"""
import os
import socket
import time

import jax

from agcg_jax.errors import UserError

_started = False


def is_main_process() -> bool:
  """Process 0 writes the run's shared files (logs, records, metrics, figures)."""
  return jax.process_index() == 0


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
  if coordinator:
    _rendezvous(coordinator, num_i, pid_i, timeout_s)
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


def _split(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  try:
    return host.strip("[]"), int(port)
  except ValueError:
    raise UserError(f"AGCG_COORDINATOR={address!r}: expected HOST:PORT") from None


def _rendezvous(address: str, num: int, pid: int, timeout_s: int) -> None:
  """A bounded pre-check that all `num` processes are there and agree, before JAX's runtime.

  JAX's client aborts the whole process (a C++ fatal error, no Python
  exception) when the coordinator never answers or the processes never all
  arrive. So process 0 first listens on the coordinator's port + 1; every
  other process connects and says (process id, process count); process 0
  checks them and answers 'ok' or the problem, and every process turns a
  problem into a one-line error.
  """
  host, port = _split(address)
  rport = port + 1
  deadline = time.monotonic() + timeout_s
  me = f"{pid} {num}\n".encode()
  if pid == 0:
    with socket.create_server(("", rport), reuse_port=hasattr(socket, "SO_REUSEPORT")) as server:
      conns, seen = [], {}
      problem = None
      try:
        while len(seen) < num - 1:
          remaining = deadline - time.monotonic()
          if remaining <= 0:
            problem = (f"only {len(seen) + 1} of AGCG_NUM_PROCESSES={num} processes reached the "
                       f"coordinator {address} within {timeout_s} s")
            break
          server.settimeout(remaining)
          try:
            conn, _ = server.accept()
          except socket.timeout:
            continue
          conn.settimeout(max(deadline - time.monotonic(), 1))
          try:
            their_pid, their_num = (int(v) for v in conn.recv(64).decode().split())
          except (OSError, ValueError):
            conn.close()
            continue
          conns.append(conn)
          if their_num != num:
            problem = (f"process {their_pid} says AGCG_NUM_PROCESSES={their_num} but the "
                       f"coordinator (process 0) says {num}")
            break
          if their_pid in seen or not 0 < their_pid < num:
            problem = f"two processes claim AGCG_PROCESS_ID={their_pid}" if their_pid in seen else (
                f"a process claims AGCG_PROCESS_ID={their_pid}, not in [1, {num})")
            break
          seen[their_pid] = conn
      finally:
        for conn in conns:
          try:
            conn.sendall(("ok" if problem is None else "error " + problem).encode())
          except OSError:
            pass
          conn.close()
      if problem:
        raise UserError(f"could not start the multi-process runtime: {problem}")
    return
  while True:
    try:
      conn = socket.create_connection((host, rport), timeout=2)
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f"could not start the multi-process runtime: coordinator {address} "
                        f"not reachable after {timeout_s} s ({e.strerror or e})") from None
      time.sleep(0.5)
  with conn:
    conn.sendall(me)
    conn.settimeout(max(deadline - time.monotonic(), 1) + 5)
    try:
      reply = conn.recv(512).decode()
    except OSError:
      reply = ""
  if reply != "ok":
    why = reply[len("error "):] if reply.startswith("error ") else "the coordinator gave no answer"
    raise UserError(f"could not start the multi-process runtime: {why}")
