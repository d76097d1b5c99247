"""From quantizer output to the AWQ "gemm" tensors of one Linear, and back.

The quantizer works on ``nn.Linear.weight`` layout ``[N, K]`` (N = out_features, K =
in_features) with ``scale``/``zero`` of shape ``[N, K/g]``. The AWQ "gemm" checkpoint format
(docs/format.md) stores the transpose, with 4-bit codes packed eight to an
int32 along N in the AWQ nibble order (:mod:`awq_nb.kernels.layout`)::

    qweight  int32 [K,   N/8]    codes q[n, k] in 0..15
    qzeros   int32 [K/g, N/8]    zero points z[n, k // g] in 0..15 (stored raw, no "-1")
    scales   fp16  [K/g, N]

    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

The codes come from the fp32 scales (exactly the integers :func:`awq_nb.quantizer.quantize_int`
gives); only the stored scales are rounded to fp16. So the dequantized weight differs from
:func:`awq_nb.quantizer.pseudo_quantize` by at most ``|q - z| * |s - fp16(s)|``, i.e.
``<= (2**bits - 1) * max(s * 2**-11, 2**-25)`` per element (fp16 keeps 11 significant bits;
scales below 2**-14 are subnormal in fp16, with a spacing of 2**-24).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import AwqNbError
from .kernels.layout import BITS, PACK_FACTOR, pack_awq, unpack_awq
from .quantizer import quantize_int

SCALE_DTYPE = torch.float16  # the format stores scales in fp16
FP16_MAX = torch.finfo(torch.float16).max


class AWQTensors(NamedTuple):
    """The three tensors of one quantized Linear in the "gemm" layout (bias is kept separately)."""

    qweight: torch.Tensor  # int32 [K, N/8]
    qzeros: torch.Tensor  # int32 [K/g, N/8]
    scales: torch.Tensor  # fp16  [K/g, N]


def check_format(w_bit: int, group_size: int, zero_point: bool = True, name: str = "this Linear") -> None:
    """Raise :class:`AwqNbError` unless these quantizer settings can be stored in the "gemm" format."""
    if w_bit != BITS:
        raise AwqNbError(
            f"{name}: the AWQ 'gemm' format packs {BITS}-bit codes only, got w_bit={w_bit}. "
            f"Use w_bit={BITS} to save or run packed kernels; other widths can only be evaluated fake-quantized."
        )
    if not zero_point:
        raise AwqNbError(
            f"{name}: zero_point=False (symmetric) is not representable in the AWQ 'gemm' format, which "
            "stores unsigned codes with a zero point per group. Quantize with zero_point=True."
        )
    if group_size == -1:
        raise AwqNbError(
            f"{name}: group_size=-1 (per-channel) is not representable in an AWQ 'gemm' checkpoint, whose "
            "config carries one numeric group size for every layer. Use group_size=128 (or 32/64/256)."
        )
    if not isinstance(group_size, int) or group_size <= 0:
        raise AwqNbError(f"{name}: group_size={group_size!r} must be a positive integer.")


def check_packable(out_features: int, in_features: int, w_bit: int, group_size: int, zero_point: bool = True,
                   name: str = "this Linear") -> None:
    """Raise :class:`AwqNbError` unless a Linear ``[N, K]`` can be stored in the "gemm" format."""
    check_format(w_bit, group_size, zero_point, name)
    if in_features % group_size:
        raise AwqNbError(
            f"{name}: in_features={in_features} is not a multiple of group_size={group_size}; pick a group size "
            "that divides it, or keep this layer in floating point (AWQConfig.skip_indivisible=True)."
        )
    if out_features % PACK_FACTOR:
        raise AwqNbError(
            f"{name}: out_features={out_features} is not a multiple of {PACK_FACTOR}; the 'gemm' format packs "
            f"{PACK_FACTOR} output channels per int32. Keep this layer in floating point (modules_to_not_convert)."
        )


def pack_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> AWQTensors:
    """Pack integer codes ``q [N, K]`` (0..15) with ``scale``/``zero [N, K/g]`` into :class:`AWQTensors`.

    ``zero`` holds integers 0..15 (any dtype); ``scale`` is rounded to fp16 and must stay finite
    and non-zero there.
    """
    if q.dim() != 2:
        raise AwqNbError(f"pack_codes: expected codes [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    check_packable(n, k, BITS, group_size)
    groups = k // group_size
    for label, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (n, groups):
            raise AwqNbError(f"pack_codes: {label} has shape {tuple(t.shape)}, expected [N, K/g] = {(n, groups)} "
                             f"for codes {tuple(q.shape)} and group_size={group_size}.")
    if zero.dtype.is_floating_point and not torch.equal(zero, zero.round()):
        raise AwqNbError("pack_codes: zero points must be integers (AWQ stores them raw as 4-bit codes).")
    scales16 = scale.to(SCALE_DTYPE)
    if not torch.isfinite(scales16).all() or (scales16 == 0).any():
        raise AwqNbError(
            f"pack_codes: some scales are 0 or overflow fp16 (|s| > {FP16_MAX:.0f}) once rounded to fp16; "
            "the weights of this layer are out of the range the AWQ format can store."
        )
    qweight = pack_awq(q.t().contiguous())  # any integer dtype: uint8 codes stay 1 byte until packed
    qzeros = pack_awq(zero.t().contiguous().to(torch.int32))
    return AWQTensors(qweight, qzeros, scales16.t().contiguous())


def pack_linear(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                w_bit: int = BITS) -> AWQTensors:
    """Quantize ``w [N, K]`` with the quantizer's ``scale``/``zero [N, K/g]`` and pack it.

    ``scale``/``zero`` are what :func:`awq_nb.quantizer.quant_params` returns for the same ``w``
    (after AWQ's scaling and clipping are folded in). Only 4-bit asymmetric quantization with a
    numeric group size is representable (see :func:`check_packable`).
    """
    if w.dim() != 2:
        raise AwqNbError(f"pack_linear: expected a weight [N, K], got shape {tuple(w.shape)}")
    check_packable(w.shape[0], w.shape[1], w_bit, group_size, zero_point=zero is not None)
    q = quantize_int(w, scale, zero, w_bit, group_size)
    return pack_codes(q, scale, zero, group_size)


def _check_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    """Shapes ``(N, K)`` implied by a packed triple, after checking that they agree."""
    for label, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if t.dim() != 2:
            raise AwqNbError(f"{label} must be 2-D, got shape {tuple(t.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if group_size <= 0 or k % group_size:
        raise AwqNbError(f"qweight has K={k} rows, not a multiple of group_size={group_size}")
    expected = {"qzeros": (k // group_size, n // PACK_FACTOR), "scales": (k // group_size, n)}
    for label, t in (("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != expected[label]:
            raise AwqNbError(f"{label} has shape {tuple(t.shape)}, expected {expected[label]} for qweight "
                             f"{tuple(qweight.shape)} and group_size={group_size}")
    return n, k


def unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """Inverse of :func:`pack_codes`: ``(q int32 [N, K], scale [N, K/g] (scales' dtype), zero int32 [N, K/g])``."""
    _check_packed(qweight, qzeros, scales, group_size)
    q = unpack_awq(qweight).t().contiguous()
    zero = unpack_awq(qzeros).t().contiguous()
    return q, scales.t().contiguous(), zero


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[N, K]`` (``nn.Linear`` layout) that a packed triple stands for, computed in fp32."""
    n, k = _check_packed(qweight, qzeros, scales, group_size)
    wt = unpack_awq(qweight).float().reshape(k // group_size, group_size, n)  # W^T grouped along K
    z = unpack_awq(qzeros).float()[:, None, :]
    s = scales.float()[:, None, :]
    return ((wt - z) * s).reshape(k, n).t().to(dtype)
