"""Triton kernel: dequantize an AWQ "gemm" weight to a dense ``W^T [K, N]``.

Reference: :func:`awq_nb.kernels.reference.dequantize_ref` (the result matches it exactly).

Used for large batches (prefill): dequantize once, then let cuBLAS run the matmul. The kernel is
bound by memory traffic: it reads ~0.5 byte and writes 2 bytes per weight.

Grid and pointers
-----------------
Program ``(pid_k, pid_n)`` owns the output tile ``rows pid_k*BLOCK_K + [0, BLOCK_K)`` x
``columns pid_n*BLOCK_N + [0, BLOCK_N)``::

    for each tile (in parallel):
        W^T[tile] = load_weight_tile(...)      # unpack nibbles, (q - z) * s  (kernels/common.py)
        store W^T[tile] at out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :]

Rows past K and columns past N are masked, so any K (multiple of the group size) and any N
(multiple of 8) work with any block size.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import (UNPACK_GATHER, UNPACK_INTERLEAVE, UNPACK_SPLIT, autotuner, check_launchable, is_interpreting,
                     load_weight_tile)
from .validate import check_awq_weight


@functools.cache
def configs(interpret: bool) -> tuple[triton.Config, ...]:
    """Autotune candidates; one big tile under the interpreter (its speed is per program)."""
    if interpret:
        return (triton.Config({"BLOCK_K": 64, "BLOCK_N": 128, "UNPACK": UNPACK_INTERLEAVE}, num_warps=4, num_stages=1),)
    return tuple(
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "UNPACK": unpack}, num_warps=w, num_stages=1)
        for bk, bn, w in ((32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8))
        for unpack in (UNPACK_INTERLEAVE, UNPACK_GATHER, UNPACK_SPLIT)
    )


@triton.jit
def _dequantize_kernel(
    # tensors: qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N], out [K, N]
    qweight_ptr, qzeros_ptr, scales_ptr, out_ptr,
    # sizes
    K, N,
    # row strides (the last dimension of every tensor is contiguous)
    stride_qk, stride_zk, stride_sk, stride_ok,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                         pid_k * BLOCK_K, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, UNPACK)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :], w, mask=mask)


@functools.cache
def _tuned(candidates: tuple[triton.Config, ...]):
    return autotuner(_dequantize_kernel, candidates, key=["K", "N", "GROUP_SIZE"])


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize with Triton. Same contract as :func:`~awq_nb.kernels.reference.dequantize_ref`.

    Args:
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: fp16/bf16/fp32 ``[K/g, N]``.
        group_size: ``g``.

    Returns:
        ``W^T [K, N]`` in ``scales.dtype``.
    """
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    check_launchable(qweight, "awq_dequantize")
    qweight, qzeros, scales = (t.contiguous() for t in (qweight, qzeros, scales))
    out = torch.empty((k, n), dtype=scales.dtype, device=qweight.device)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _tuned(configs(is_interpreting()))[grid](
        qweight, qzeros, scales, out,
        k, n,
        qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size,
    )
    return out
