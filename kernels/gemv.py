"""Triton kernel: GEMV / small-M ``x @ W^T (+ bias)`` on the native layout, for decoding (M <= 8).

Reference: :func:`awq_nb.kernels.reference.gemm_ref`.

At batch 1 a Linear is bound by reading its weight: ~4.14 bits per weight instead of 16, so the
best possible speed-up over fp16 is ~3.9x. But an H200 moves ~4.3 TB/s, i.e. each of its 132 SMs
must consume ~33 weights per clock while issuing at most 128 thread-instructions per clock: the
whole inner loop may spend ~3.9 instructions per weight. This kernel is written to that budget
(``python bench/kernels.py --compile-report 90`` counts it; docs/kernels.md has the figures):

* each thread loads 4 neighbouring words of the native layout with one 128-bit load: 4 columns x
  8 consecutive k = 32 weights;
* two weights become two exact fp16 numbers ``q - z`` with one ``lop3`` and one f16x2 op
  (kernels/nibbles.py), then fp32 with one convert each; one FMA per weight with x;
* x is read eight values per 128-bit load and converted once per k, not once per weight; the
  rows of a warp share it (it sits in uniform registers);
* the scale is applied once per word (``acc += s * sum_j x_j (q_j - z)``), the zero costs nothing
  per weight (it is subtracted inside the f16x2 op);
* accumulators stay unreduced ``[R, BLOCK_N]`` inside the K loop; one cross-warp reduction after it;
* no tensor cores, no shared memory in the loop, so the same code suits a T4 (sm75).

Algorithm
---------
Program ``(pid_n, pid_k)`` owns columns ``pid_n*BLOCK_N + [0, BLOCK_N)`` of every row of x and
the K steps ``pid_k, pid_k + SPLIT_K, ...`` of BLOCK_K = 8R rows each (a step lies in one group)::

    acc[m, r, n] = 0                                     # [BLOCK_M, R, BLOCK_N] fp32
    for each K step k0:
        w = qweight[k0/8 : k0/8 + R, n_tile]             # [R, BLOCK_N] int32 words (128-bit loads)
        z, s = zeros[k0 / g, n_tile], scales[k0 / g, n_tile]
        for j in 0..7:  d_j = q[k0 + 8r + j, n] - z      # exact, kernels/nibbles.py
        acc[m] += s * sum_j x[m, k0 + 8r + j] * d_j      # x: eight values per 128-bit load
    out[m, n_tile] = sum_r acc[m, r, :] (+ bias)         # split-K protocol, kernels/common.py

Launch configuration (:func:`launch_config`, no autotuning): BLOCK_N = 128 columns, R = 16 word
rows (BLOCK_K = 128) for M = 1 and fewer rows for more x rows (the accumulator grows with M),
4 warps, and a split of K that gives at least 4 programs per SM (4096x4096 on 132 SMs: 32 column
tiles x 32 = 1024 programs). A step that would straddle a group boundary (g < BLOCK_K) is avoided
by taking BLOCK_K = g.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from awq_nb.errors import AwqNbError

from .common import (aligned_activation, check_native_launch, is_interpreting, launch_buffers, sm_count, split_for,
                     write_tile)
from .native import NativeInt4
from .nibbles import codes_minus_zero, load_scale_f32, load_x8, load_zero

MAX_ROWS = 8  # most rows of x in one launch; larger batches belong to the tensor-core GEMM
BLOCK_N = 128
NUM_WARPS = 4
ROWS_BY_M = {1: 16, 2: 8, 4: 4, 8: 4}  # word rows per step (BLOCK_K / 8) for each BLOCK_M


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = NUM_WARPS

    def grid(self, n: int) -> tuple[int, int]:
        return triton.cdiv(n, self.block_n), self.split_k

    def ctas(self, n: int) -> int:
        tiles, split = self.grid(n)
        return tiles * split


def launch_config(m: int, n: int, k: int, group_size: int, sms: int) -> GemvConfig:
    """The configuration :func:`awq_gemv` launches for ``x [m, k] @ W^T [k, n]`` on ``sms`` SMs."""
    block_m = max(1, triton.next_power_of_2(m))
    block_k = min(8 * ROWS_BY_M[block_m], group_size)
    while group_size % block_k:  # g a multiple of 8 but not of a power of two >= 8: one word row per step
        block_k //= 2
    block_k = max(block_k, 8)
    tiles = triton.cdiv(n, BLOCK_N)
    return GemvConfig(block_m, BLOCK_N, block_k, split_for(tiles, triton.cdiv(k, block_k), sms))


@triton.jit
def _gemv_kernel(
    # tensors: x [M, K], native qweight int32 [K/8, N], zeros uint8 [K/g, N], scales [K/g, N],
    # bias [N] (ignored unless HAS_BIAS), out [M, N] in x.dtype; split-K scratch (kernels/common.py)
    x_ptr, qweight_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr, tickets_ptr,
    # sizes
    M, N, K,
    # row strides (every last dimension is contiguous)
    stride_xm, stride_qk, stride_zk, stride_sk, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr,
    X_BF16: tl.constexpr, S_BF16: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    R: tl.constexpr = BLOCK_K // 8
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Masked rows and columns read row 0 / column 0 (the asm loads cannot be masked); their
    # results are never stored, and rows of x past M are zero-weighted by m_ok below.
    m_safe = tl.where(m_ok, offs_m, 0)[:, None, None]          # [BLOCK_M, 1, 1]
    if EVEN_N:
        n_safe = offs_n[None, None, :]                          # [1, 1, BLOCK_N]
    else:  # N is a multiple of 8, so runs of 4 columns are all in or all out: keep 128-bit loads
        n_safe = tl.max_contiguous(tl.multiple_of(tl.where(n_ok, offs_n, 0), 4), 4)[None, None, :]
    acc = tl.zeros((BLOCK_M, R, BLOCK_N), dtype=tl.float32)
    for k_start in tl.range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K, loop_unroll_factor=1):
        rows = k_start // 8 + offs_r                           # word rows of this step
        r_safe = rows[None, :, None]                            # [1, R, 1]; BLOCK_K divides g, g divides K
        words = tl.load(qweight_ptr + r_safe * stride_qk + n_safe)           # [1, R, BLOCK_N]
        group = k_start // GROUP_SIZE
        zlo, zhi = load_zero(zeros_ptr + group * stride_zk + n_safe, USE_ASM)   # [1, 1, BLOCK_N]
        s = load_scale_f32(scales_ptr + group * stride_sk + n_safe, S_BF16, USE_ASM)
        x0, x1, x2, x3, x4, x5, x6, x7 = load_x8(x_ptr + m_safe * stride_xm + r_safe * 8 + 0 * n_safe, X_BF16, USE_ASM)
        d0, d1, d2, d3, d4, d5, d6, d7 = codes_minus_zero(words, tl.broadcast_to(zlo, words.shape),
                                                          tl.broadcast_to(zhi, words.shape), USE_ASM)
        t = x0 * d0 + x1 * d1 + x2 * d2 + x3 * d3 + x4 * d4 + x5 * d5 + x6 * d6 + x7 * d7   # [BLOCK_M, R, BLOCK_N]
        acc += t * s
    total = tl.sum(acc, axis=1)                                # [BLOCK_M, BLOCK_N]
    total = tl.where(m_ok[:, None], total, 0.0)
    write_tile(total, out_ptr, ws_ptr, tickets_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, pid_n,
               HAS_BIAS, SPLIT_K)


def kernel_args(x: torch.Tensor, w: NativeInt4, bias, out, workspace, tickets, config: GemvConfig, use_asm: bool):
    """Positional and keyword arguments of :func:`_gemv_kernel` (shared with the compile report)."""
    m, k = x.shape
    args = (x, w.qweight, w.zeros, w.scales, bias if bias is not None else out, out, workspace, tickets,
            m, w.out_features, k, x.stride(0), w.qweight.stride(0), w.zeros.stride(0), w.scales.stride(0),
            out.stride(0))
    meta = dict(GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, SPLIT_K=config.split_k,
                EVEN_N=w.out_features % config.block_n == 0, X_BF16=x.dtype == torch.bfloat16,
                S_BF16=w.scales.dtype == torch.bfloat16, USE_ASM=use_asm, num_warps=config.num_warps, num_stages=1,
                enable_fp_fusion=True)  # x * d + acc as one FMA: the instruction budget counts on it
    return args, meta


def awq_gemv(x: torch.Tensor, w: NativeInt4, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for ``1 <= M <= 8`` rows of fp16/bf16 ``x [M, K]`` and a native weight
    (:func:`awq_nb.kernels.native.to_native`). Returns ``[M, N]`` in ``x.dtype`` (fp32 accumulation).
    ``config`` overrides :func:`launch_config` (benchmarks, tests)."""
    k, n = check_native_launch("awq_gemv", x, w, bias)
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise AwqNbError(f"awq_gemv takes 1..{MAX_ROWS} rows, got x with M={m}; use awq_nb.kernels.awq_gemm "
                         "or awq_matmul, which picks the kernel from M.")
    x = aligned_activation(x)
    config = config or launch_config(m, n, k, w.group_size, sm_count(x.device))
    if w.group_size % config.block_k:
        raise AwqNbError(f"awq_gemv: BLOCK_K={config.block_k} must divide group_size={w.group_size} (a K step "
                         "reads one row of zeros and scales).")
    out, workspace, tickets = launch_buffers(x, n)
    args, meta = kernel_args(x, w, bias, out, workspace, tickets, config, use_asm=not is_interpreting())
    _gemv_kernel[config.grid(n)](*args, **meta)
    return out
