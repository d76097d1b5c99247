"""Helpers that show the kernels without running them: for notebook 05 and for machines without Triton.

Plain Python and numpy; nothing here imports triton. Triton has no wheels for macOS or Windows, so
a notebook must still show the kernels' source (read as text from the package folder), the bit
trick (emulated in numpy, instruction by instruction) and the compile report (a saved JSON file)
there, and say once that launching a kernel needs Linux or a GPU.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np

from .layout import AWQ_ORDER

KERNEL_DIR = Path(__file__).resolve().parent
TRITON_NOTE = ("Triton kernels need Linux (their CPU interpreter) or a CUDA GPU, and Triton is not installed here "
               "(it has no macOS or Windows wheels): the cells below run the torch reference path instead.")


def prepare_triton(environ=None) -> str | None:
    """Where the Triton kernels can run: ``"gpu"``, ``"interpreter"`` (CPU, after setting
    ``TRITON_INTERPRET=1``, which must happen before triton is first imported), or None when triton
    cannot be imported."""
    import torch

    environ = os.environ if environ is None else environ
    if not torch.cuda.is_available():
        environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return "gpu" if torch.cuda.is_available() and environ.get("TRITON_INTERPRET", "0") in ("0", "") else "interpreter"


def mode_line(mode: str | None) -> str:
    return {"gpu": "Triton kernels: compiled for this GPU",
            "interpreter": "Triton kernels: in Triton's CPU interpreter (TRITON_INTERPRET=1; slow, same kernel code)",
            None: TRITON_NOTE}[mode]


def kernel_source(module: str, name: str) -> str:
    """The source text of top-level ``name`` (function, class or constant) in ``kernels/<module>.py``,
    read from the file: no import, so it works where triton is missing."""
    path = KERNEL_DIR / f"{module}.py"
    text = path.read_text()
    for node in ast.parse(text).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if name in names:
            lines = text.splitlines()
            start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno]) - 1
            return "\n".join(lines[start:node.end_lineno])
    raise KeyError(f"{name!r} is not a top-level name of {path}")


# ----------------------------------------------------------------------------------------------
# the bit trick, emulated (what kernels/nibbles.py does in PTX)

PAIRS = (  # (mask, shift of the word, k offsets of the fp16x2 pair, x16?)
    (0x000F000F, 0, (0, 1), False), (0x00F000F0, 0, (2, 3), True),
    (0x000F000F, 8, (4, 5), False), (0x00F000F0, 8, (6, 7), True),
)


def pack_k_word(codes) -> int:
    """One native word from the 8 codes of k offsets 0..7 (nibble i holds offset AWQ_ORDER[i])."""
    word = 0
    for i, offset in enumerate(AWQ_ORDER):
        word |= (int(codes[offset]) & 0xF) << (4 * i)
    return word


def _pair(words, zeros, mask: int, shift: int, x16: bool):
    """One fp16x2 pair of each word: the lop3 bits, them read as fp16 ``[.., 2]``, and ``q - z``."""
    words = np.atleast_1d(np.asarray(words, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint64)
    bits = (((words >> np.uint64(shift)) & np.uint64(mask)) | np.uint64(0x64006400)).astype(np.uint32)
    half = bits.view(np.float16).reshape(*bits.shape, 2)           # [low, high] (little endian)
    z = np.atleast_1d(np.asarray(zeros, dtype=np.float32))[..., None]
    if x16:  # fma.rn.f16x2: exact in fp32, so one rounding to fp16 as the instruction does
        out = (half.astype(np.float32) * np.float32(1 / 16) - (64 + z)).astype(np.float16)
    else:    # sub.f16x2
        out = (half.astype(np.float32) - (1024 + z)).astype(np.float16)
    return bits, half, out


def decode_words(words, zeros) -> np.ndarray:
    """``q[k] - z`` for k offsets 0..7 of each word, as fp16 ``[.., 8]``, computed the kernels' way."""
    return np.concatenate([_pair(words, zeros, mask, shift, x16)[2] for mask, shift, _, x16 in PAIRS], axis=-1)


def bit_trick(word: int, zero: int) -> list[dict]:
    """Each of the four fp16x2 pairs of ``word`` through the kernel's instructions (a table):
    ``lop3`` -> ``(w >> shift) & mask | 0x64006400`` read as two fp16, then ``sub.f16x2 (1024 + z)``
    or ``fma.rn.f16x2 (x 1/16, -(64 + z))``; ``q - z`` of k offsets (2p, 2p + 1) comes out."""
    rows = []
    for mask, shift, ks, x16 in PAIRS:
        bits, half, out = (a[0] for a in _pair(word, zero, mask, shift, x16))
        op = f"fma.rn.f16x2: x/16 - {64 + zero}" if x16 else f"sub.f16x2: x - {1024 + zero}"
        rows.append({"k offsets": f"{ks[0]}, {ks[1]}", "lop3 mask": f"0x{mask:08x}", "word >>": shift,
                     "bits": f"0x{int(bits):08x}", "as fp16x2": f"{float(half[0]):g}, {float(half[1]):g}", "then": op,
                     "q - z": f"{float(out[0]):g}, {float(out[1]):g}"})
    return rows


def load_compile_report(root: Path | None) -> dict | None:
    """The saved compile report (``docs/compile-report.json``) of a repository checkout, if any."""
    path = None if root is None else Path(root) / "docs" / "compile-report.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def repo_root(start: Path | None = None) -> Path | None:
    """The awq-nb checkout above ``start`` (default: the working directory), found by bench/kernels.py."""
    start = Path.cwd() if start is None else Path(start)
    return next((p for p in (start, *start.parents) if (p / "bench" / "kernels.py").is_file()), None)
