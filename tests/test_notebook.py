"""Executes notebooks/explore_run against a synthetic evaluated run, in a fresh kernel."""
import json
import os
import subprocess
import sys

import jupytext
import pytest

from tests import report_fixtures as fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_PY = os.path.join(ROOT, "notebooks", "explore_run.py")
NOTEBOOK_IPYNB = os.path.join(ROOT, "notebooks", "explore_run.ipynb")

# Run in a subprocess so the kernel and its matplotlib state never touch the
# test process. The notebook runs in notebooks/, as in Jupyter.
_EXECUTE = """
import sys
import jupytext
import nbformat
from nbclient import NotebookClient

source, out, cwd = sys.argv[1:]
nb = jupytext.read(source)
NotebookClient(nb, timeout=120, kernel_name="python3",
               resources={"metadata": {"path": cwd}}).execute()
nbformat.write(nb, out)
"""


def _code_sources(nb) -> list[str]:
  return [c.source for c in nb.cells if c.cell_type == "code"]


def test_paired_ipynb_matches_py():
  # Regenerate with: jupytext --to ipynb notebooks/explore_run.py
  assert _code_sources(jupytext.read(NOTEBOOK_IPYNB)) == _code_sources(jupytext.read(NOTEBOOK_PY))


@pytest.mark.slow
def test_notebook_runs_on_a_synthetic_run(tmp_path):
  workdir = fixtures.make_workdir(tmp_path)
  out = tmp_path / "executed.ipynb"
  env = {**os.environ, "AGCG_WORKDIR": workdir}
  proc = subprocess.run(
      [sys.executable, "-c", _EXECUTE, NOTEBOOK_PY, str(out), os.path.join(ROOT, "notebooks")],
      env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]

  with open(out) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  outputs = [o for c in cells for o in c.get("outputs", [])]
  assert not [o for o in outputs if o["output_type"] == "error"]
  text = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
  assert fixtures.ACCURACY_ORIGINAL_TEXT in text and fixtures.ACCURACY_TRANSLATED_TEXT in text
  assert workdir in text
  # Two translation figures, the CAM grid and the training curves, shown inline.
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 4
