"""The example notebooks run top to bottom under nbval (what CI runs; also `make` can call
``python -m pytest --nbval-lax --nbval-current-env notebooks/`` directly).

Each notebook runs in its own pytest process with a real ipykernel, without ``TRITON_INTERPRET``
(on CPU the kernels then take their exact PyTorch path, as a user's CPU session would). Cells
marked ``# NBVAL_CHECK_OUTPUT`` must reproduce their stored output; live cells are ignored.
"""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_are_committed_clean():
    """Only the deterministic check cells keep outputs; nothing else is committed with results."""
    assert len(NAMES) == 5
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            checked = "NBVAL_CHECK_OUTPUT" in cell.source or "nbval-check-output" in cell.metadata.get("tags", [])
            if checked:
                assert cell.outputs and cell.execution_count, f"{name} {cell.id}: a check cell needs its expected output"
            else:
                assert not cell.outputs and cell.execution_count is None, f"{name} {cell.id}: commit live cells clean"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_under_nbval(name, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["MPLBACKEND"] = "Agg"
    cmd = [sys.executable, "-m", "pytest", "-q", "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=900",
           "-p", "no:cacheprovider", "--rootdir", str(NOTEBOOKS), str(NOTEBOOKS / name)]
    done = subprocess.run(cmd, cwd=NOTEBOOKS, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
