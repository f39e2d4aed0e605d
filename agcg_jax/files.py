"""Writing a file whole: a reader, or a crash, never sees half of it.

Every result file of a run (metrics.json, report.html, examples.npz, a
stage's config.json, cohort.json) is written to a temporary name beside it
and renamed onto it, so the previous version stays intact until the new one
is complete.
"""
import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

from agcg_jax.errors import UserError

# mkstemp creates files readable by the owner only; results get the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
  """Yields a temporary path beside `path`, renamed onto `path` when the block succeeds.

  Args:
    path: the file to (re)write; its folder is created if needed.
    suffix: the temporary file's suffix (np.savez appends ".npz" to any
      other name, so pass ".npz" there).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
  except OSError as e:  # name the file the caller wanted, not a temporary
    raise OSError(e.errno, e.strerror, path) from None
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename == tmp:
      raise OSError(e.errno, e.strerror, path) from None
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> None:
  """Writes `obj` as indented JSON (and a final newline) to `path` atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def output_dir(path: str | os.PathLike, option: str = "--out") -> str:
  """Creates the output folder `path` if needed; a file there or a refusal is one UserError line."""
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{option} {path} is not a folder")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"{option} {path}: cannot create it ({e.strerror})") from None
  return path
