"""Writing a file whole (files.py): the old version survives a failed write; errors name the file."""
import json
import os

import pytest

from agcg_jax import files


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
  path = tmp_path / "metrics.json"
  files.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("{half")
      raise RuntimeError("killed mid-write")
  assert json.loads(path.read_text()) == {"a": 1}
  assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
  files.write_json(path, {"b": 2}, sort_keys=True)
  assert json.loads(path.read_text()) == {"b": 2}
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
