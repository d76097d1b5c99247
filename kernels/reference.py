"""Plain torch references for the INT4 kernels (same signatures as the Triton wrappers).

They define what the kernels compute, bit for bit where possible:

* ``dequantize_ref``: ``W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]``, the product taken in
  float32 and rounded once to ``scales.dtype`` (exact for the integer part, so the only rounding
  is that last one; the Triton dequantize kernel matches it exactly).
* ``gemm_ref``: ``x @ W^T (+ bias)`` with the dequantized ``W^T`` above, accumulated in float32
  and rounded once to ``x.dtype``.

Slow (they materialise the whole weight), but short enough to read against the format
description in ``kernels/layout.py``.
"""
from __future__ import annotations

import torch

from .layout import unpack_awq
from .validate import check_activation, check_awq_weight


def dequantize_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize an AWQ "gemm" weight.

    Args:
        qweight: int32 ``[K, N/8]``, packed along N in the AWQ order.
        qzeros: int32 ``[K/g, N/8]``, same packing.
        scales: float16/bfloat16/float32 ``[K/g, N]``.
        group_size: ``g``, input channels per group.

    Returns:
        ``W^T`` of shape ``[K, N]`` in ``scales.dtype`` (transposed relative to ``nn.Linear.weight``).
    """
    check_awq_weight(qweight, qzeros, scales, group_size)
    q = unpack_awq(qweight)                                        # [K, N]
    z = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)    # [K, N]
    s = scales.float().repeat_interleave(group_size, dim=0)        # [K, N]
    return ((q - z).float() * s).to(scales.dtype)


def gemm_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for an AWQ "gemm" weight.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``.
        qweight, qzeros, scales, group_size: as in :func:`dequantize_ref`.
        bias: optional ``[N]``.

    Returns:
        ``[M, N]`` in ``x.dtype``, accumulated in float32.
    """
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    check_activation(x, k, qweight.device, bias, n)
    out = x.float() @ dequantize_ref(qweight, qzeros, scales, group_size).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
