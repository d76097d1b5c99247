"""Triton kernel: GEMV / small-M ``x @ W^T (+ bias)`` for decoding (M <= MAX_ROWS = 8 rows).

Reference: :func:`awq_nb.kernels.reference.gemm_ref`.

At batch 1..8 a Linear layer is bound by reading its weight: ~4.14 bits per weight here instead
of 16, so the best possible speed-up over fp16 is ~3.9x. There is nothing for tensor cores to do,
so this kernel uses no ``tl.dot``: products are formed by broadcasting and reduced with
``tl.sum``. That also keeps it fast on GPUs where Triton has no MMA path (T4 / sm75 with
triton >= 3.3, whose ``tl.dot`` falls back to FMA).

Algorithm
---------
Program ``(pid_n, pid_k)`` owns columns ``pid_n*BLOCK_N + [0, BLOCK_N)`` of every row of x (all M
rows fit in one BLOCK_M, a power of two >= M) and every ``SPLIT_K``-th BLOCK_K slice of K::

    acc = zeros([BLOCK_M, BLOCK_N], fp32)
    for k_start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        a = x[:, k_start : k_start + BLOCK_K]                            # [BLOCK_M, BLOCK_K]
        w = dequantize(...)[k_start : k_start + BLOCK_K, n_tile]        # [BLOCK_K, BLOCK_N]
        acc += sum(a[:, :, None] * w[None, :, :], axis=1)                # [BLOCK_M, BLOCK_N]
    out[:, n_tile] = acc (+ bias), by the last of the SPLIT_K programs  # see kernels/common.py

The broadcast product has BLOCK_M * BLOCK_K * BLOCK_N elements in registers, so configs whose
product is too big for their warps are pruned before autotuning. Split-K matters most here: a
4096-wide layer has only 32 tiles of 128 columns, far fewer than the SMs of an H100 (132).

Without FACTOR_GROUP the weight is dequantized to the scales' dtype exactly like the reference,
then multiplied in fp32, so the only difference from ``gemm_ref`` is the order of the fp32
additions. With FACTOR_GROUP (an autotune choice, when a tile lies in one group) the kernel
computes ``s * (sum x q - z * sum x)`` in fp32: the weight is never rounded to the scales' dtype,
and the two sums partly cancel, so results differ from the reference by fp32 rounding of sums of
up to ``15 * sum |x|`` (far inside the tests' fp16/bf16 bound).

With UNPACK_WORDS (an autotune choice) the tiles stay in the packed words' shape: codes, zeros and
scales are ``[.., BLOCK_N/8, 8]``, the product ``[BLOCK_M, BLOCK_K, BLOCK_N/8, 8]``, and the
accumulator is flattened to ``[BLOCK_M, BLOCK_N]`` once, after the K loop, so no register shuffle
happens per weight tile. The other UNPACK ways are described in kernels/common.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import (UNPACK_GATHER, UNPACK_INTERLEAVE, UNPACK_SPLIT, UNPACK_WORDS, autotuner, is_interpreting,
                     launch_matmul, load_codes_tile, load_weight_tile, write_tile)

MAX_ROWS = 8  # most rows of x one BLOCK_M holds; larger batches belong to the tl.dot GEMM
PRODUCT_ELEMENTS_PER_THREAD = 64  # register budget for the [BLOCK_M, BLOCK_K, BLOCK_N] product


@functools.cache
def configs(interpret: bool) -> tuple[triton.Config, ...]:
    """Autotune candidates (pruned by :func:`_prune` for the batch's BLOCK_M). One under the interpreter."""
    if interpret:
        return (triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1, "FACTOR_GROUP": True, "UNPACK": UNPACK_SPLIT},
                              num_warps=4, num_stages=1),)
    return tuple(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "FACTOR_GROUP": factor, "UNPACK": unpack},
                               num_warps=w, num_stages=st)
                 for bn, bk, sk, w, st in GPU_CANDIDATES for factor in (True, False)
                 for unpack in (UNPACK_INTERLEAVE, UNPACK_GATHER, UNPACK_SPLIT, UNPACK_WORDS))


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), each tried with and without FACTOR_GROUP (the
# per-group factoring of zero and scale; it applies when the group size is a multiple of BLOCK_K)
# and with each way of unpacking the packed words (UNPACK, kernels/common.py: load_codes).
# Big tiles serve M = 1..2, small ones survive _prune for M = 4..8; SPLIT_K 4..16 gives a
# 4096-wide layer 128..512 programs.
GPU_CANDIDATES = (
    (64, 128, 8, 4, 2), (128, 64, 8, 4, 2), (128, 128, 4, 8, 3), (64, 256, 4, 8, 3), (32, 256, 16, 4, 2),
    (64, 64, 8, 4, 2), (32, 128, 16, 4, 2), (32, 64, 16, 4, 2), (64, 32, 8, 4, 2), (32, 32, 16, 4, 2),
    (64, 32, 8, 8, 2),
)


def _prune(candidates, named_args, **kwargs):
    """Keep configs whose broadcast product fills between half and all of the register budget
    (smaller tiles waste the warps, larger ones spill); the smallest tile if none qualifies."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))

    def load(c):  # product elements per thread, in units of the budget
        return block_m * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] / (PRODUCT_ELEMENTS_PER_THREAD * 32 * c.num_warps)

    fits = [c for c in candidates if 0.5 <= load(c) <= 1.0]
    return fits or [min(candidates, key=load)]


@triton.jit
def _row_dot(a, w, UNPACK: tl.constexpr):
    """``sum_k a[m, k] * w[k, ...]`` by broadcasting: ``a [BLOCK_M, BLOCK_K]``, ``w [BLOCK_K, BLOCK_N]``
    (or ``[BLOCK_K, BLOCK_N/8, 8]`` for UNPACK_WORDS) -> ``[BLOCK_M, ...]``."""
    if UNPACK == 3:
        return tl.sum(a[:, :, None, None] * w[None, :, :, :], axis=1)
    else:
        return tl.sum(a[:, :, None] * w[None, :, :], axis=1)


@triton.jit
def _per_row(v, UNPACK: tl.constexpr):
    """``v [BLOCK_M]`` made broadcastable against :func:`_row_dot`'s result."""
    if UNPACK == 3:
        return v[:, None, None]
    else:
        return v[:, None]


@triton.jit
def _gemv_kernel(
    # tensors: x [M, K], qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N],
    # bias [N] (ignored unless HAS_BIAS), out [M, N] in x.dtype; split-K scratch (kernels/common.py):
    # ws_ptr [M, N] fp32 workspace and tickets_ptr int32 per-tile counters, both zero between launches
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr, tickets_ptr,
    # sizes
    M, N, K,
    # strides (weights, scales and out have contiguous last dimensions)
    stride_xm, stride_xk, stride_qk, stride_zk, stride_sk, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_GROUP: tl.constexpr,
    UNPACK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M

    if UNPACK == 3:  # UNPACK_WORDS: tiles are [.., BLOCK_N/8, 8], flattened once after the loop
        acc = tl.zeros((BLOCK_M, BLOCK_N // 8, 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if FACTOR_GROUP and GROUP_SIZE % BLOCK_K == 0:
            # The tile lies in one group, so sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k):
            # per weight only unpack, convert and multiply-add; zero and scale once per column.
            q, z, s = load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                      k_start, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, UNPACK)
            xz = _per_row(tl.sum(a, axis=1), UNPACK) * z.to(tl.float32)  # [BLOCK_M, <columns>]
            acc += (_row_dot(a, q.to(tl.float32), UNPACK) - xz) * s.to(tl.float32)
        else:
            w = load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                 k_start, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, UNPACK)
            acc += _row_dot(a, w.to(tl.float32), UNPACK)
    if UNPACK == 3:
        acc = tl.reshape(acc, (BLOCK_M, BLOCK_N))

    write_tile(acc, out_ptr, ws_ptr, tickets_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, pid_n, HAS_BIAS, SPLIT_K)


@functools.cache
def _tuned(candidates: tuple[triton.Config, ...]):
    return autotuner(_gemv_kernel, candidates, key=["BLOCK_M", "N", "K", "GROUP_SIZE"], prune=_prune)


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~awq_nb.kernels.gemm.awq_gemm` (same arguments and result) for ``1 <= M <= MAX_ROWS`` (8)."""
    block_m = triton.next_power_of_2(x.shape[0]) if x.dim() == 2 else 1
    return launch_matmul("awq_gemv", _tuned(configs(is_interpreting())), _grid, x, qweight, qzeros, scales, group_size,
                         bias, max_rows=MAX_ROWS, BLOCK_M=max(block_m, 1))


def _grid(meta, m, n):
    return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
