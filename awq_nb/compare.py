"""fp vs round-to-nearest vs AWQ on one model, as table rows: the one comparison of the package.

The CLI demo (``python -m awq_nb demo``), the widget's Run (awq_nb/widgets.py) and notebooks 00
and 06 all call :func:`compare_methods`. Each row is one method at one config, measured on the same
calibration blocks and evaluation windows. Methods, by name:

- ``"fp"``: the model as given (once, whatever the configs);
- ``"rtn"``: round-to-nearest on a copy, no calibration (:func:`awq_nb.fake_quantize`);
- ``"awq"``: AWQ on a copy, with the config's own ``rounding`` (:func:`awq_nb.quantize`: search,
  apply the scales and clips, round);
- ``"awq+<rounding>"``, e.g. ``"awq+gptq"``: AWQ with ``AWQConfig(rounding=<rounding>)`` whatever
  the config says (:mod:`awq_nb.rounding` lists the roundings).

A row's ``method`` names what ran: ``"awq"`` for AWQ with round-to-nearest, ``"awq+gptq"`` for
AWQ with GPTQ rounding (however it was asked for).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from .config import AWQConfig
from .data import calibration_blocks, eval_windows
from .engine import check_model, fake_quantize, quantize
from .errors import AwqNbError
from .evaluate import model_size_bytes, perplexity
from .progress import Progress
from .results import AWQResult
from .rounding import get_rounder
from .settings import FULL, QUALITY_WINDOWS

METHODS = ("fp", "rtn", "awq")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def awq_rounding(method: str, config: AWQConfig) -> str | None:
    """The rounding an AWQ method rounds with (None: not an AWQ method); an unknown name is an error."""
    if method in ("fp", "rtn"):
        return None
    if method == "awq":
        return config.rounding
    if method.startswith("awq+"):
        rounding = method.removeprefix("awq+")
        get_rounder(rounding)  # an unknown rounding is an error listing the known ones
        return rounding
    raise AwqNbError(f"unknown method {method!r}: use 'fp', 'rtn', 'awq' or 'awq+<rounding>' (e.g. 'awq+gptq').")


def method_label(method: str, config: AWQConfig) -> str:
    """``"awq"`` for AWQ with round-to-nearest, ``"awq+gptq"`` for AWQ with GPTQ rounding, else ``method``."""
    rounding = awq_rounding(method, config)
    if rounding is None:
        return method
    return "awq" if rounding == "rtn" else f"awq+{rounding}"


def _labelled(progress: Progress | None, label: str) -> Progress | None:
    """``progress`` with every description prefixed by ``label`` (None stays None: the defaults apply)."""
    if progress is None:
        return None
    return lambda done, total, desc="": progress(done, total, f"{label}: {desc}" if desc else label)


def compare_methods(
    model: nn.Module,
    tokenizer,
    configs: list[AWQConfig],
    methods: tuple[str, ...] = METHODS,
    calib=None,
    windows: torch.Tensor | None = None,
    n_samples: int = FULL.n_samples,
    seqlen: int = FULL.seqlen,
    eval_seqlen: int = FULL.eval_seqlen,
    max_windows: int | None = QUALITY_WINDOWS,
    device=None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = print,
    on_model: Callable[[dict, nn.Module, AWQResult | None], None] | None = None,
    seed: int = FULL.seed,
    eval_data: str = FULL.eval_data,
) -> list[dict]:
    """Perplexity, size and AWQ search time of each method (module docstring) at each config.

    ``calib``: token blocks ``LongTensor [n, T]``, or a text source cut into ``n_samples`` x
    ``seqlen`` blocks with ``seed`` (default: :data:`~awq_nb.settings.FULL`'s, the 1900-1989
    speeches). ``windows``: evaluation windows ``[n, T]`` (default: ``max_windows`` windows of
    ``eval_seqlen`` tokens of ``eval_data``, the 1990+ speeches). Every method sees the same blocks
    and windows. ``model`` is not modified; each method works on a copy, freed once measured unless
    ``on_model(row, model, result)`` (called after each row, with the measured model and the AWQ
    result, None for fp and rtn) keeps a reference. ``progress(done, total, desc)`` hears of every
    step, each description prefixed by the method; ``log`` gets one line per row (None: silent).

    Returns one dict per row: ``method``, ``config`` (the config's tag, or the fp dtype), ``perplexity``,
    ``windows``, ``tokens``, ``size_bytes`` (Linears the method left in floating point counted as
    such) and ``search_seconds`` (AWQ only).
    """
    for cfg in configs:
        for method in methods:
            awq_rounding(method, cfg)  # every name checked before any work
    if not isinstance(calib, torch.Tensor) and any(awq_rounding(m, c) for m in methods for c in configs):
        if progress:
            progress(0, 1, f"calibration text: {n_samples} x {seqlen} tokens")
        calib = calibration_blocks(tokenizer, FULL.calib if calib is None else calib, n_samples=n_samples,
                                   seqlen=seqlen, seed=seed)
    if windows is None:
        if progress:
            progress(0, 1, f"evaluation text: {eval_data}")
        windows = eval_windows(tokenizer, eval_data, seqlen=eval_seqlen, max_windows=max_windows)
    rows = []

    def add(method: str, tag: str, m: nn.Module, size: int, result: AWQResult | None = None):
        r = perplexity(m, windows=windows, progress=_labelled(progress, f"{method} {tag} perplexity"))
        row = {"method": method, "config": tag, "perplexity": r["perplexity"], "windows": r["windows"],
               "tokens": r["tokens"], "size_bytes": size, "search_seconds": None if result is None else result.seconds}
        rows.append(row)
        if log:
            log(f"{method:>8} {tag:>8}  ppl {row['perplexity']:.3f}")
        if on_model:
            on_model(row, m, result)

    if "fp" in methods:
        add("fp", DTYPE_NAMES.get(next(model.parameters()).dtype, "fp"), model, model_size_bytes(model))
    for cfg in configs:
        for method in (m for m in methods if m != "fp"):
            rounding, label = awq_rounding(method, cfg), method_label(method, cfg)
            copied = copy.deepcopy(model)
            if rounding is None:
                keep, result = check_model(model, cfg), None
                fake_quantize(copied, cfg, keep=keep)
            else:
                result = quantize(copied, tokenizer, replace(cfg, rounding=rounding), calib=calib,
                                  progress=_labelled(progress, f"{label} {cfg.tag}"), device=device)
                keep = result.config["modules_to_not_convert"]
            size = model_size_bytes(copied, cfg.w_bit, cfg.group_size, cfg.zero_point, keep=tuple(keep))
            add(label, cfg.tag, copied, size, result)
            del copied
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_methods` rows (and of peer rows with the same keys)."""
    fp = next((r["perplexity"] for r in rows if r["method"] == "fp"), None)
    lines = ["| method | config | perplexity | vs fp | size (MB) | search (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        gap = "" if fp is None or r["method"] == "fp" else f"{r['perplexity'] - fp:+.3f}"
        secs = "" if r.get("search_seconds") is None else f"{r['search_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['config']} | {r['perplexity']:.3f} | {gap} | {r['size_bytes'] / 1e6:.1f} | {secs} |")
    return "\n".join(lines)
