"""The kernel-native INT4 layout: AWQ "gemm" tensors repacked once, at load, for the GPU kernels.

An AutoAWQ checkpoint packs eight 4-bit codes per int32 *along N* (``qweight [K, N/8]``). A GEMV
that streams such words reads each word's 8 columns for one ``k``, so every weight needs its own
shift, mask and convert. The native layout packs *along K* instead, contiguous along N::

    qweight  int32 [K/8, N]   word (r, n) holds codes of k = 8r .. 8r+7 for column n,
                              nibble i = k offset AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]
    zeros    uint8 [K/g, N]   the zero points, unpacked (one byte each)
    scales         [K/g, N]   unchanged (the same tensor as the checkpoint's)

Why these choices (details in docs/kernels.md):

* contiguous along N, a thread loads 4 neighbouring words (4 columns x 8 k) with one 128-bit load;
* keeping AWQ's nibble order inside the word, ``(w >> s) & 0x000F000F | 0x64006400`` read as two
  fp16 is ``(1024 + q[k], 1024 + q[k+1])`` for a pair of *consecutive* k: s = 0 gives k offsets
  (0, 1), the mask ``0x00F000F0`` gives 16x the codes of (2, 3), and s = 8 gives (4, 5) and (6, 7).
  So one ``lop3`` and one ``sub.f16x2`` turn two codes into two exact fp16 values, in order;
* zeros as bytes: they are needed once per group and column, and a byte costs 0.5 B more than the
  packed nibble per group and column (0.75 % of a g = 128 layer's packed bytes), where fp16 zeros
  would cost 2.3 %.

The repacking is lossless: :func:`from_native` gives back the checkpoint's tensors bit for bit, so
``save_quantized`` still writes AutoAWQ "gemm" checkpoints. Plain torch; it runs on any device,
in row chunks so a 7B layer needs only a few MB of temporaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_nb.errors import AwqNbError

from .layout import AWQ_ORDER, BITS, PACK_FACTOR, pack_awq, unpack_awq
from .validate import check_awq_weight

CHUNK_WORDS = 1 << 22  # int32 words repacked at a time (16 MB of codes in flight)


@dataclass
class NativeInt4:
    """One Linear in the kernel-native layout (see the module docstring).

    ``qweight`` int32 ``[K/8, N]``, ``zeros`` uint8 ``[K/g, N]``, ``scales`` ``[K/g, N]``,
    ``group_size`` g (a multiple of 8)."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK_FACTOR

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.zeros, self.scales))


def native_supported(in_features: int, group_size: int) -> bool:
    """Whether a layer fits the native layout: a word holds 8 consecutive k of one group."""
    return group_size % PACK_FACTOR == 0 and in_features % group_size == 0


def check_native(w: NativeInt4) -> tuple[int, int]:
    """Check a :class:`NativeInt4` and return ``(K, N)``; errors name the tensor and the fix."""
    if not isinstance(w, NativeInt4):
        raise AwqNbError(f"expected a NativeInt4 (awq_nb.kernels.native.to_native), got {type(w).__name__}")
    if w.qweight.dtype != torch.int32 or w.qweight.dim() != 2:
        raise AwqNbError(f"native qweight must be int32 [K/8, N], got {w.qweight.dtype} {tuple(w.qweight.shape)}")
    k, n = w.in_features, w.out_features
    g = w.group_size
    if not isinstance(g, int) or g <= 0 or not native_supported(k, g):
        raise AwqNbError(f"native layout needs a group size that is a multiple of 8 and divides K={k}, got {g!r}")
    if w.zeros.dtype != torch.uint8 or tuple(w.zeros.shape) != (k // g, n):
        raise AwqNbError(f"native zeros must be uint8 [K/g, N] = [{k // g}, {n}], got {w.zeros.dtype} "
                         f"{tuple(w.zeros.shape)}; build it with to_native().")
    if tuple(w.scales.shape) != (k // g, n):
        raise AwqNbError(f"native scales must be [K/g, N] = [{k // g}, {n}], got {tuple(w.scales.shape)}")
    if not (w.qweight.device == w.zeros.device == w.scales.device):
        raise AwqNbError(f"native qweight ({w.qweight.device}), zeros ({w.zeros.device}) and scales "
                         f"({w.scales.device}) must be on one device; move them together.")
    return k, n


def _codes_along_k(words: torch.Tensor) -> torch.Tensor:
    """Native words ``[R, N]`` -> int32 codes ``[8R, N]`` in natural k order: the checkpoint's
    unpacking, along the other axis (a word holds k offsets in the same nibble order)."""
    return unpack_awq(words.t()).t()


def _pack_along_k(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[8R, N]`` -> int32 ``[R, N]``, nibble i holding row offset AWQ_ORDER[i]."""
    rows = codes.reshape(-1, PACK_FACTOR, codes.shape[1]).to(torch.int32)
    word = torch.zeros_like(rows[:, 0])
    for i, offset in enumerate(AWQ_ORDER):
        word |= rows[:, offset] << (BITS * i)  # int32 shifts wrap, so nibble 7 lands in the sign bit
    return word


def to_native(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> NativeInt4:
    """Repack AWQ "gemm" tensors into the native layout, on their device (``scales`` is shared, not copied)."""
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    if not native_supported(k, group_size):
        raise AwqNbError(f"the native INT4 layout needs group_size to be a multiple of 8, got {group_size}; "
                         "such layers run through awq_nb.kernels.awq_matmul on the AutoAWQ tensors instead.")
    out = torch.empty((k // PACK_FACTOR, n), dtype=torch.int32, device=qweight.device)
    rows = max(PACK_FACTOR, (CHUNK_WORDS // max(n, 1)) // PACK_FACTOR * PACK_FACTOR)
    for start in range(0, k, rows):
        codes = unpack_awq(qweight[start:start + rows])
        out[start // PACK_FACTOR:(start + codes.shape[0]) // PACK_FACTOR] = _pack_along_k(codes)
    return NativeInt4(out, unpack_awq(qzeros).to(torch.uint8), scales, group_size)


def from_native(w: NativeInt4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AWQ "gemm" ``(qweight, qzeros, scales)`` of a native weight, bit for bit as before :func:`to_native`."""
    k, n = check_native(w)
    qweight = torch.empty((k, n // PACK_FACTOR), dtype=torch.int32, device=w.device)
    rows = max(1, CHUNK_WORDS // max(n, 1))
    for start in range(0, k // PACK_FACTOR, rows):
        codes = _codes_along_k(w.qweight[start:start + rows])               # [8r, N], natural k order
        qweight[start * PACK_FACTOR:start * PACK_FACTOR + codes.shape[0]] = pack_awq(codes)
    return qweight, pack_awq(w.zeros.to(torch.int32)), w.scales


def dequantize_native(w: NativeInt4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W^T [K, N]`` of a native weight in plain torch (any device; where Triton is missing), equal to
    :func:`~awq_nb.kernels.reference.dequantize_ref` of the checkpoint tensors in ``scales.dtype``."""
    check_native(w)
    codes = _codes_along_k(w.qweight)
    z = w.zeros.to(torch.int32).repeat_interleave(w.group_size, dim=0)
    s = w.scales.float().repeat_interleave(w.group_size, dim=0)
    return ((codes - z).float() * s).to(dtype or w.scales.dtype)
