"""The AWQ "gemm" 4-bit packing: eight nibbles per int32, in the AWQ order.

A packed tensor ``[R, C/8]`` int32 holds an int tensor ``[R, C]`` with values 0..15. Nibble ``i``
(bits ``4*i .. 4*i+3``) of word ``c`` holds column ``c*8 + AWQ_ORDER[i]``::

    word c:   bits 31..28  27..24  23..20  19..16  15..12  11..8  7..4  3..0
    nibble:        7       6       5       4       3       2      1     0
    column:     c*8+7   c*8+3   c*8+6   c*8+2   c*8+5   c*8+1  c*8+4  c*8+0

``qweight [K, N/8]`` and ``qzeros [K/g, N/8]`` of an AWQ checkpoint both use it (packed along N).
To unpack: shift right by ``4*i``, mask ``0xF``, then put nibble ``AWQ_REVERSE_ORDER[j]`` in
column ``j``. Nibble 7 uses the sign bit, so words are often negative; the mask handles that.

These helpers are plain torch and run on any device; the Triton kernels do the same unpacking
in registers (see ``kernels/dequant.py``).
"""
from __future__ import annotations

import torch

from awq_nb.errors import AwqNbError

BITS = 4
PACK_FACTOR = 32 // BITS  # values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its group of 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]

_SHIFTS = tuple(BITS * i for i in range(PACK_FACTOR))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Unpack ``packed [R, C/8]`` int32 (AWQ order) into ``int32 [R, C]`` with values 0..15."""
    if packed.dtype != torch.int32:
        raise AwqNbError(f"unpack_awq: expected an int32 packed tensor, got {packed.dtype}; "
                         "AWQ qweight/qzeros are int32 (load them without casting).")
    if packed.dim() != 2:
        raise AwqNbError(f"unpack_awq: expected a 2-D packed tensor [R, C/8], got shape {tuple(packed.shape)}")
    # column j of each word sits in nibble AWQ_REVERSE_ORDER[j]: one broadcast shift puts them in order
    shifts = torch.tensor([BITS * AWQ_REVERSE_ORDER[j] for j in range(PACK_FACTOR)], dtype=torch.int32,
                          device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


PACK_CHUNK = 1 << 20  # values packed per step by pack_awq


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack ``values [R, C]`` (integers 0..15, C a multiple of 8) into ``int32 [R, C/8]`` (AWQ order)."""
    if values.dim() != 2:
        raise AwqNbError(f"pack_awq: expected a 2-D integer tensor [R, C], got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise AwqNbError(f"pack_awq: expected an integer tensor, got {values.dtype}; round and cast first "
                         "(e.g. q.round().to(torch.int32)).")
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise AwqNbError(f"pack_awq: {cols} columns is not a multiple of {PACK_FACTOR}; "
                         "AWQ packs 8 values per int32, so out_features must be a multiple of 8.")
    if values.numel() and (values.min() < 0 or values.max() > 2**BITS - 1):
        raise AwqNbError(f"pack_awq: values must lie in 0..{2**BITS - 1}, got "
                         f"{int(values.min())}..{int(values.max())}; clamp the codes before packing.")
    order = torch.tensor(AWQ_ORDER, device=values.device)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)
    out = torch.empty(rows, cols // PACK_FACTOR, dtype=torch.int32, device=values.device)
    step = max(1, PACK_CHUNK // max(cols, 1))  # rows at a time: the int64 temporaries stay ~PACK_CHUNK * 8 bytes
    for r in range(0, rows, step):
        nibbles = values[r : r + step].to(torch.int64).reshape(-1, cols // PACK_FACTOR, PACK_FACTOR)[..., order]
        words = (nibbles << shifts).sum(dim=-1)  # 0 .. 2**32-1 in int64
        out[r : r + step] = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return out
