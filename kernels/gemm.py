"""Triton kernel: W4A16 GEMM ``x @ W^T (+ bias)`` dequantizing the AWQ weight inside the kernel.

Reference: :func:`awq_nb.kernels.reference.gemm_ref`.

For mid-sized batches (roughly M = 8..256): the weight is read once per M-tile as 4-bit codes
(a quarter of the fp16 bytes) and dequantized in registers just before ``tl.dot``, so the dense
``W^T`` never exists in memory.

Blocked algorithm (as in Triton tutorial 03, plus a split of K)
--------------------------------------------------------------
Program ``(pid_m, pid_n, pid_k)`` computes a ``[BLOCK_M, BLOCK_N]`` tile of the output from every
``SPLIT_K``-th BLOCK_K slice of K::

    acc = zeros([BLOCK_M, BLOCK_N], fp32)
    for k_start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        a = x[m_tile, k_start : k_start + BLOCK_K]                     # [BLOCK_M, BLOCK_K]
        w = dequantize(qweight, qzeros, scales)[k_start : ..., n_tile]  # [BLOCK_K, BLOCK_N]
        acc += dot(a, w)
    out[m_tile, n_tile] = acc (+ bias)  # SPLIT_K == 1; else the last of the tile's SPLIT_K
                                        # programs stores the sum, see kernels/common.py

Pointers: ``x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk`` for the
activations; the weight tile comes from ``load_weight_tile`` (kernels/common.py). Rows of x past
M, k past K and columns past N are masked to 0, so no shape has to be a multiple of a block.

Why split K: with small M there are only ``cdiv(N, BLOCK_N)`` output tiles, too few programs to
keep every SM streaming weights; splitting K multiplies the programs by SPLIT_K at the price of a
float32 reduction. The autotuner picks SPLIT_K together with the block sizes, with M bucketed and
the group size in its key.

Operands of ``tl.dot`` are fp16 for fp16 activations (no sm80-only feature on that path), bf16
for bf16 on a GPU, and fp32 for bf16 under the interpreter (its bf16 dot is broken); the
accumulator is fp32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import (SPLIT_K_MAX_M, UNPACK_GATHER, UNPACK_INTERLEAVE, UNPACK_SPLIT, autotuner, dot_dtype,
                     is_interpreting, launch_matmul, load_weight_tile, write_tile)


@functools.cache
def configs(interpret: bool) -> tuple[triton.Config, ...]:
    """Autotune candidates. Under the interpreter: one config with large tiles (fewest programs)."""
    if interpret:
        return (triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 2, "UNPACK": UNPACK_GATHER},
                              num_warps=4, num_stages=1),)
    return tuple(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "UNPACK": unpack}, num_warps=w,
                               num_stages=st)
                 for bm, bn, bk, sk, w, st in GPU_CANDIDATES
                 for unpack in (UNPACK_INTERLEAVE, UNPACK_GATHER, UNPACK_SPLIT))


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); _prune keeps the rows whose
# BLOCK_M suits the batch, so each M bucket benchmarks about five. None spills registers on
# sm90 (ptxas -v, triton 3.9); 128x256x64 and 128x128x128 did, so they are not here.
GPU_CANDIDATES = (
    (16, 64, 128, 4, 4, 4), (16, 128, 128, 2, 4, 3), (16, 64, 64, 1, 4, 4),
    (32, 64, 128, 2, 4, 4), (32, 128, 64, 1, 4, 4),
    (64, 64, 128, 2, 4, 4), (64, 128, 64, 1, 4, 4), (64, 128, 128, 1, 8, 3),
    (128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 8, 4), (64, 256, 64, 1, 8, 3),
)


def _block_m_range(m_bucket: int) -> tuple[int, int]:
    """BLOCK_M sizes worth trying for a batch of ``m_bucket`` rows (a power of two)."""
    if m_bucket <= 32:
        return 16, 32
    if m_bucket <= 128:
        return 32, 64
    return 64, 128


def _prune(candidates, named_args, **kwargs):
    """Keep the BLOCK_M sizes that suit the batch, and split-K only where the protocol allows it."""
    m_bucket = named_args["M_BUCKET"]
    low, high = _block_m_range(m_bucket)
    allowed = [c for c in candidates if c.kwargs["SPLIT_K"] == 1 or m_bucket <= SPLIT_K_MAX_M]
    fits = [c for c in allowed if low <= c.kwargs["BLOCK_M"] <= high]
    return fits or allowed


@triton.jit
def _gemm_kernel(
    # tensors: x [M, K], qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N],
    # bias [N] (ignored unless HAS_BIAS), out [M, N] in x.dtype; split-K scratch (kernels/common.py):
    # ws_ptr [M, N] fp32 workspace and tickets_ptr int32 per-tile counters, both zero between launches
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr, tickets_ptr,
    # sizes
    M, N, K,
    # strides (weights, scales and out have contiguous last dimensions)
    stride_xm, stride_xk, stride_qk, stride_zk, stride_sk, stride_om,
    # autotune key only: M rounded up to a power of two, so each batch-size bucket is tuned once
    M_BUCKET,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    UNPACK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        w = load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                             k_start, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, UNPACK)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)

    tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
    write_tile(acc, out_ptr, ws_ptr, tickets_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, tile, HAS_BIAS, SPLIT_K)


@functools.cache
def _tuned(candidates: tuple[triton.Config, ...]):
    return autotuner(_gemm_kernel, candidates, key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune=_prune)


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with Triton, any M. Same contract as :func:`~awq_nb.kernels.reference.gemm_ref`
    except that ``x`` must be float16 or bfloat16.

    Args:
        x: fp16/bf16 ``[M, K]``.
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: fp16/bf16 ``[K/g, N]``.
        group_size: ``g``.
        bias: optional ``[N]``.

    Returns:
        ``[M, N]`` in ``x.dtype`` (fp32 accumulation).
    """
    m_bucket = triton.next_power_of_2(x.shape[0]) if x.dim() == 2 else 1
    return launch_matmul("awq_gemm", _tuned(configs(is_interpreting())), _grid, x, qweight, qzeros, scales, group_size,
                         bias, (m_bucket,), DOT_DTYPE=dot_dtype(x.dtype))


def _grid(meta, m, n):
    return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
