"""Shared plumbing for the peer runners: CLI, calibration loading, output folder, peer.json.

Imported by `run_autoawq.py` and `run_llmcompressor.py`, which run inside their own peer venv
(`.venv-peers/<peer>`), so this module depends only on torch, safetensors and the standard
library. Nothing here touches a peer's algorithm.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def parse_args(description: str) -> argparse.Namespace:
    """The CLI both runners share; `extra` options are added by each runner afterwards."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, type=Path,
                   help="HF model folder (fp32 safetensors, Llama architecture)")
    p.add_argument("--calib", required=True, type=Path,
                   help="JSON list of lists of token ids, n_samples x seqlen, used verbatim")
    p.add_argument("--w-bit", required=True, type=int, choices=(3, 4))
    p.add_argument("--group-size", required=True, type=int, choices=(64, 128))
    p.add_argument("--out", required=True, type=Path, help="output HF model folder")
    return p


def load_calib(path: Path) -> list[list[int]]:
    """Read the calibration token ids and check they form an n_samples x seqlen block."""
    ids = json.loads(Path(path).read_text())
    if not (isinstance(ids, list) and ids and all(isinstance(r, list) and r for r in ids)):
        raise ValueError(f"{path}: expected a non-empty JSON list of non-empty lists of ints")
    seqlen = len(ids[0])
    if any(len(r) != seqlen for r in ids):
        raise ValueError(f"{path}: rows differ in length; every sample must have {seqlen} ids")
    if not all(isinstance(t, int) for r in ids for t in r):
        raise ValueError(f"{path}: token ids must be JSON integers")
    return ids


def check_group_size(model_dir: Path, group_size: int) -> None:
    """Fail early, naming the dimension, when a Linear's in_features is not divisible."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size"):
        if cfg[key] % group_size:
            raise ValueError(f"{model_dir}: {key}={cfg[key]} is not a multiple of "
                             f"--group-size {group_size}; pick a group size that divides it")


def source_weight_keys(model_dir: Path) -> list[str]:
    """Tensor names stored in the source folder's safetensors files (tied weights once)."""
    keys: list[str] = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            keys.extend(h.keys())
    if not keys:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return keys


def write_dense_folder(src: Path, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write `out` as an HF folder: src's non-weight files plus one fp32 model.safetensors.

    The tensor names are exactly those of the source checkpoint, so the result loads like the
    original fp folder; `state_dict` must hold every one of them.
    """
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    keys = source_weight_keys(src)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise KeyError(f"quantized model lacks source tensors {missing[:5]} (of {len(missing)})")
    tensors = {k: state_dict[k].detach().to("cpu", torch.float32).contiguous() for k in keys}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far.

    Reported beside wall time: on this shared 2-core machine wall time swings with other
    people's load, CPU time much less (though spin-waiting threads still inflate it).
    """
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory: ``awq_nb.memory.peak_rss_bytes``, the
    measure our quantizer reports. The file is loaded by path, because the peer venvs do not
    install awq_nb (and its package ``__init__`` would import transformers' newer API)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("awq_nb_memory", Path(__file__).resolve().parents[2] / "awq_nb" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    return memory.peak_rss_bytes()


class BlockClock:
    """Per-block wall times from a peer method that runs once per decoder block.

    `wrap(cls, name, at, when)` wraps cls.name so that each call records perf_counter() at its
    start (at="start": the method opens a block) or end (at="end": it closes one); with
    `when(*args, **kwargs)` given, only calls for which it is true (checked before the call)
    count. The wrapper only times; it changes no argument and no result.
    `block_seconds(t0, t1)` gives one duration per block, with t0/t1 the start/end of the
    timed region.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.at = "start"

    def wrap(self, cls, name: str, at: str, when=None) -> str:
        original = getattr(cls, name)
        stamps, self.at = self.stamps, at

        def timed(*args, **kwargs):
            count = when is None or when(*args, **kwargs)
            if count and at == "start":
                stamps.append(time.perf_counter())
            out = original(*args, **kwargs)
            if count and at == "end":
                stamps.append(time.perf_counter())
            return out

        setattr(cls, name, timed)
        return f"{cls.__name__}.{name} wrapped to record a timestamp at its {at} (timing only)"

    def block_seconds(self, t0: float, t1: float) -> list[float]:
        edges = self.stamps + [t1] if self.at == "start" else [t0] + self.stamps
        return [round(b - a, 3) for a, b in zip(edges[:-1], edges[1:])]


def write_peer_json(out: Path, record: dict) -> None:
    (Path(out) / "peer.json").write_text(json.dumps(record, indent=2) + "\n")
