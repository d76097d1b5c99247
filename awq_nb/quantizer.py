"""Group-wise integer quantization of weight matrices (the "Q" in AWQ).

All functions take a weight ``w`` of shape ``[N, K]`` (rows = output channels, columns = input
channels, the ``nn.Linear.weight`` layout) and work on groups of ``group_size`` consecutive input
channels of one row; ``group_size=-1`` means one group per row (per-channel).

Asymmetric (``zero_point=True``, the AutoAWQ "gemm" semantics, see docs/format.md)::

    scale = (max - min).clamp(min=1e-5) / (2**bits - 1)
    zero  = clamp(-round(min / scale), 0, 2**bits - 1)
    q     = clamp(round(w / scale) + zero, 0, 2**bits - 1)
    w'    = (q - zero) * scale

Symmetric (``zero_point=False``)::

    scale = absmax.clamp(min=1e-5) / (2**(bits-1) - 1)
    q     = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)
    w'    = q * scale
"""
from __future__ import annotations

import torch

from .errors import AwqNbError

MIN_BITS, MAX_BITS = 2, 8
SCALE_EPS = 1e-5


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise AwqNbError(f"w_bit={bits!r} is not supported: choose an integer from {MIN_BITS} to {MAX_BITS}.")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``w [N, K]`` as ``[N * K/g, g]`` (or ``[N, K]`` for per-channel)."""
    if w.dim() != 2:
        raise AwqNbError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size == -1:
        return w.reshape(n, k)
    if group_size <= 0 or k % group_size:
        raise AwqNbError(
            f"in_features={k} is not a multiple of group_size={group_size}; "
            f"group sizes that fit: {fitting_group_sizes(k)} (or -1 for per-channel)."
        )
    return w.reshape(-1, group_size)


def fitting_group_sizes(k: int, candidates=(32, 64, 128, 256)) -> list[int]:
    return [g for g in candidates if k % g == 0]


def quant_params(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True):
    """Scales and zeros for ``w [N, K]``.

    Returns ``(scale, zero)`` each of shape ``[N, K/g]`` (``[N, 1]`` per-channel), in fp32;
    ``zero`` is None when ``zero_point`` is False.
    """
    check_bits(bits)
    n = w.shape[0]
    g = _grouped(w.float(), group_size)
    if zero_point:
        max_int = 2**bits - 1
        wmax = g.amax(dim=1, keepdim=True)
        wmin = g.amin(dim=1, keepdim=True)
        scale = (wmax - wmin).clamp(min=SCALE_EPS) / max_int
        zero = (-torch.round(wmin / scale)).clamp(0, max_int)
        return scale.reshape(n, -1), zero.reshape(n, -1)
    absmax = g.abs().amax(dim=1, keepdim=True)
    scale = absmax.clamp(min=SCALE_EPS) / (2 ** (bits - 1) - 1)
    return scale.reshape(n, -1), None


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes of ``w [N, K]`` given its ``scale``/``zero`` ``[N, K/g]``. Returns int32 ``[N, K]``
    (0..2**bits-1 with a zero point, -2**(bits-1)..2**(bits-1)-1 without)."""
    n, k = w.shape
    g = _grouped(w.float(), group_size)
    s = scale.reshape(-1, 1)
    if zero is not None:
        q = (torch.round(g / s) + zero.reshape(-1, 1)).clamp(0, 2**bits - 1)
    else:
        q = torch.round(g / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.reshape(n, k).to(torch.int32)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int`: fp32 ``[N, K]``."""
    n, k = q.shape
    g = _grouped(q.float(), group_size)
    z = 0.0 if zero is None else zero.reshape(-1, 1).float()
    return ((g - z) * scale.reshape(-1, 1).float()).reshape(n, k)


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True,
                    extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize then dequantize ``w [N, K]`` ("fake quantization"); same shape and dtype as ``w``.

    Computed in fp32 whatever the input dtype, so fp16/bf16 weights round the same way. The
    same arithmetic as :func:`quant_params` + :func:`quantize_int` + :func:`dequantize_int`,
    fused with in-place ops because the searches call it thousands of times.

    ``extremes``: each group's ``(min, max)`` (``[N * K/g]`` values each), when the caller already
    knows them exactly (the clipping search does), to skip the pass that finds them. Symmetric
    quantization uses only the larger magnitude of the two.
    """
    return _pseudo_quantize(w, bits, group_size, zero_point, extremes, inplace=False)


def pseudo_quantize_(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """:func:`pseudo_quantize` in place on a contiguous fp32 ``w [N, K]`` (same values, no temporary
    the size of ``w``); returns ``w``."""
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise AwqNbError(f"pseudo_quantize_ needs a contiguous fp32 weight, got {w.dtype}"
                         f"{'' if w.is_contiguous() else ' (not contiguous)'}: use pseudo_quantize.")
    return _pseudo_quantize(w, bits, group_size, zero_point, None, inplace=True)


def _pseudo_quantize(w, bits, group_size, zero_point, extremes, inplace: bool) -> torch.Tensor:
    check_bits(bits)
    n, k = w.shape
    g = _grouped(w, group_size).float()
    if extremes is not None:
        wmin, wmax = extremes[0].reshape(-1, 1).float().clone(), extremes[1].reshape(-1, 1).float()
    if zero_point:
        max_int = 2**bits - 1
        if extremes is None:
            wmin, wmax = torch.aminmax(g, dim=1, keepdim=True)
        scale = (wmax - wmin).clamp_(min=SCALE_EPS).div_(max_int)
        zero = torch.round(wmin.neg_().div_(scale)).clamp_(0, max_int)
        q = g.div_(scale).round_() if inplace else torch.div(g, scale).round_()
        out = q.add_(zero).clamp_(0, max_int).sub_(zero).mul_(scale)
    else:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        absmax = g.abs().amax(dim=1, keepdim=True) if extremes is None else torch.maximum(wmin.abs_(), wmax.abs())
        scale = absmax.clamp_(min=SCALE_EPS).div_(hi)
        q = g.div_(scale).round_() if inplace else torch.div(g, scale).round_()
        out = q.clamp_(lo, hi).mul_(scale)
    return out.reshape(n, k).to(w.dtype)
