"""What the notebooks share: setup, the compute budget, activation statistics, temporary weight
edits and a plain line plot. Nothing here is AWQ itself; the algorithm lives in the engine.

``setup_notebook()`` is every notebook's first call. It picks the device (CUDA when present, else
CPU), turns on inline figures (the :mod:`awq_nb.viz` plots return bare Figures, which Jupyter
only draws with the inline backend on) and chooses a :class:`~awq_nb.settings.Budget`:
:data:`~awq_nb.settings.FAST` with ``AWQ_NB_FAST=1`` (CI, a quick look), else the paper's
:data:`~awq_nb.settings.FULL`; ``AWQ_NB_MODEL`` overrides the model. Both budgets, and what each
spends, are defined once in :mod:`awq_nb.settings`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .arch import find_quantizable, get_blocks, get_spec, weight_nk
from .config import AWQConfig
from .results import ChannelStats
from .settings import Budget, budget, is_fast

OUT_ENV = "AWQ_NB_OUT"      # where notebooks write checkpoints (default ./outputs)


@dataclass
class NotebookEnv:
    """What :func:`setup_notebook` decided: ``device``/``dtype`` to load models with, the budget,
    and ``out_dir`` for checkpoints."""

    fast: bool
    device: str
    dtype: torch.dtype
    budget: Budget
    out_dir: Path


def _inline_figures() -> None:
    """``%matplotlib inline`` when running under IPython (a no-op in a plain interpreter)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")


def setup_notebook(seed: int = 0, environ=None) -> NotebookEnv:
    """Pick device, dtype and budget, seed torch, show figures inline; prints what it chose."""
    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available()
    env = NotebookEnv(
        fast=is_fast(environ),
        device="cuda" if cuda else "cpu",
        dtype=torch.float16 if cuda else torch.float32,
        budget=budget(environ),
        out_dir=Path(environ.get(OUT_ENV, "outputs")),
    )
    torch.manual_seed(seed)
    _inline_figures()
    b = env.budget
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {where} | {'FAST' if env.fast else 'full'} budget | model: {b.model}")
    print(f"calibration {b.n_samples} x {b.seqlen} tokens ({b.calib}); "
          f"evaluation {b.eval_windows} x {b.eval_seqlen} tokens ({b.eval_data})")
    if b.blocks is not None:
        print(f"AWQ searches cover the first {b.blocks} decoder blocks only; the rest stay in floating point")
    return env


# -- which Linears an experiment quantizes ------------------------------------------------------

def quantized_names(model: nn.Module, budget: Budget) -> list[str]:
    """Full names of the decoder Linears the budget quantizes (those of the first ``blocks`` blocks)."""
    spec = get_spec(model)
    n = len(get_blocks(model, spec)) if budget.blocks is None else budget.blocks
    heads = tuple(f"{spec.blocks}.{i}." for i in range(n))
    return [name for name in find_quantizable(model) if name.startswith(heads)]


def awq_config(model: nn.Module, budget: Budget, **fields) -> AWQConfig:
    """An :class:`AWQConfig` with the budget's search settings; Linears outside the budget's blocks
    go to ``modules_to_not_convert``. ``fields`` set anything else (``w_bit``, ``group_size``...)."""
    chosen = set(quantized_names(model, budget))
    kept = [name for name in find_quantizable(model) if name not in chosen]
    settings = dict(n_grid=budget.n_grid, clip_grid=budget.clip_grid, search_samples=budget.search_samples,
                    modules_to_not_convert=kept)
    settings.update(fields)
    return AWQConfig(**settings)


# -- activation statistics ----------------------------------------------------------------------

@torch.no_grad()
def activation_stats(model: nn.Module, tokens: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, ChannelStats]:
    """Mean and max |x| per input channel of decoder Linears over calibration ``tokens``.

    ``tokens``: LongTensor ``[n, T]`` (e.g. :func:`awq_nb.calibration_blocks`); ``names``: full
    Linear names (default: all). One forward of the base model per sequence (no LM head).
    Returns ``{name: ChannelStats}`` with fp32 ``[K]`` vectors on the CPU.
    """
    linears = find_quantizable(model)
    wanted = list(linears) if names is None else list(names)
    sums: dict[str, torch.Tensor] = {}
    maxs: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(wanted, 0)

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().float()
            sums[name] = sums[name] + x.sum(0) if name in sums else x.sum(0)
            maxs[name] = torch.maximum(maxs[name], x.amax(0)) if name in maxs else x.amax(0)
            counts[name] += x.shape[0]
        return fn

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in wanted]
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    try:
        for ids in tokens.split(1):
            base(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: ChannelStats(mean_abs=(sums[n] / counts[n]).cpu(), max_abs=maxs[n].cpu(), tokens=counts[n])
            for n in wanted}


# -- temporary weight edits -----------------------------------------------------------------------

@contextlib.contextmanager
def edited_weights(model: nn.Module, edit: Callable[[str, torch.Tensor], torch.Tensor], names: Iterable[str]):
    """Inside the ``with`` block, each Linear in ``names`` has weight ``edit(name, w)``; the
    original weights come back on exit (even after an error).

    ``edit`` takes the full Linear name and its weight ``[N, K]`` (out, in) and returns a tensor
    of the same shape. Cheaper than copying the model for each variant of an experiment.
    """
    linears = find_quantizable(model)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for n in names:
                w = weight_nk(linears[n])
                saved[n] = w.clone()
                w.copy_(edit(n, w).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                weight_nk(linears[n]).copy_(w)


# -- a plain line plot for sweeps (error vs bits, loss vs clip ratio) ------------------------------

def plot_curves(x, curves: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
                logy: bool = False, ax=None):
    """One line per entry of ``curves`` (label -> y values over ``x``); returns the Figure."""
    from .viz import _axes, _finish

    fig, ax = _axes(ax)
    for label, y in curves.items():
        ax.plot(list(x), list(y), "o-", markersize=3, linewidth=1.0, label=label, gid="data")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    _finish(ax, title, xlabel, ylabel)
    return fig
