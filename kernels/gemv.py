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
    out[:, n_tile] = acc (+ bias)  or  atomic_add(workspace, acc)     # see kernels/common.py

The broadcast product has BLOCK_M * BLOCK_K * BLOCK_N elements in registers, so configs whose
product is too big for their warps are pruned before autotuning. Split-K matters most here: a
4096-wide layer has only 32 tiles of 128 columns, far fewer than the SMs of an H100 (132).

Without FACTOR_GROUP the weight is dequantized to the scales' dtype exactly like the reference,
then multiplied in fp32, so the only difference from ``gemm_ref`` is the order of the fp32
additions. With FACTOR_GROUP (an autotune choice, when a tile lies in one group) the kernel
computes ``s * (sum x q - z * sum x)`` in fp32: the weight is never rounded to the scales' dtype,
and the two sums partly cancel, so results differ from the reference by fp32 rounding of sums of
up to ``15 * sum |x|`` (far inside the tests' fp16/bf16 bound).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from awq_nb.errors import AwqNbError

from .common import (autotuner, is_interpreting, launch_matmul, load_codes_tile, load_weight_tile, write_tile,
                     zero_workspace_if_split)
from .validate import check_activation, check_awq_weight

MAX_ROWS = 8  # most rows of x one BLOCK_M holds; larger batches belong to the tl.dot GEMM
PRODUCT_ELEMENTS_PER_THREAD = 64  # register budget for the [BLOCK_M, BLOCK_K, BLOCK_N] product


@functools.cache
def configs(interpret: bool) -> tuple[triton.Config, ...]:
    """Autotune candidates (pruned by :func:`_prune` for the batch's BLOCK_M). One under the interpreter."""
    if interpret:
        return (triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1, "FACTOR_GROUP": True, "GATHER": False},
                              num_warps=4, num_stages=1, pre_hook=zero_workspace_if_split),)
    return tuple(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "FACTOR_GROUP": factor, "GATHER": gather},
                               num_warps=w, num_stages=st, pre_hook=zero_workspace_if_split)
                 for bn, bk, sk, w, st in GPU_CANDIDATES for factor in (True, False) for gather in (True, False))


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), each tried with and without FACTOR_GROUP (the
# per-group factoring of zero and scale; it applies when the group size is a multiple of BLOCK_K)
# and with and without GATHER (how packed words are unpacked, kernels/common.py: load_word_tile).
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
def _gemv_kernel(
    # tensors: x [M, K], qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N],
    # bias [N] (ignored unless HAS_BIAS), out [M, N] in x.dtype, ws_ptr [M, N] fp32 workspace
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr,
    # sizes
    M, N, K,
    # strides (weights, scales and out have contiguous last dimensions)
    stride_xm, stride_xk, stride_qk, stride_zk, stride_sk, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_GROUP: tl.constexpr,
    GATHER: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if FACTOR_GROUP and GROUP_SIZE % BLOCK_K == 0:
            # The tile lies in one group, so sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k):
            # per weight only unpack, convert and multiply-add; zero and scale once per column.
            q, z, s = load_codes_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                      k_start, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, GATHER)
            xq = tl.sum(a[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)      # [BLOCK_M, BLOCK_N]
            xz = tl.sum(a, axis=1)[:, None] * z.to(tl.float32)                        # [BLOCK_M, BLOCK_N]
            acc += (xq - xz) * s.to(tl.float32)
        else:
            w = load_weight_tile(qweight_ptr, qzeros_ptr, scales_ptr, stride_qk, stride_zk, stride_sk,
                                 k_start, pid_n * BLOCK_N, K, N, GROUP_SIZE, BLOCK_K, BLOCK_N, GATHER).to(tl.float32)
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)

    write_tile(acc, out_ptr, ws_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, HAS_BIAS, SPLIT_K)


@functools.cache
def _tuned(candidates: tuple[triton.Config, ...]):
    return autotuner(_gemv_kernel, candidates, key=["BLOCK_M", "N", "K", "GROUP_SIZE"], prune=_prune)


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with Triton for ``M <= MAX_ROWS``. Same contract as
    :func:`~awq_nb.kernels.reference.gemm_ref` except that ``x`` must be float16 or bfloat16.

    Args:
        x: fp16/bf16 ``[M, K]`` with ``1 <= M <= 8``.
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: fp16/bf16 ``[K/g, N]``.
        group_size: ``g``.
        bias: optional ``[N]``.

    Returns:
        ``[M, N]`` in ``x.dtype`` (fp32 accumulation).
    """
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    check_activation(x, k, qweight.device, bias, n)
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise AwqNbError(f"awq_gemv takes 1..{MAX_ROWS} rows, got x with M={m}; use awq_nb.kernels.awq_gemm "
                         "or awq_matmul, which picks the kernel from M.")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise AwqNbError(f"awq_gemv takes float16 or bfloat16 activations, got {x.dtype}; cast x "
                         "(awq_matmul does this for float32).")
    return launch_matmul("awq_gemv", _tuned(configs(is_interpreting())), _grid, x, qweight, qzeros, scales, bias, n,
                         GROUP_SIZE=group_size, BLOCK_M=max(triton.next_power_of_2(m), 1))


def _grid(meta, m, n):
    return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]
