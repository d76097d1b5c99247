"""Triton kernel: W4A16 GEMM ``x @ W^T (+ bias)`` on the native layout, for M = 2..64 (tensor cores).

Reference: :func:`awq_nb.kernels.reference.gemm_ref`.

For small and mid-sized batches the weight is still the bulk of the bytes, so it is read once per
M-tile as 4-bit codes and dequantized in registers right before ``tl.dot``.

Dequantizing straight to fp16
-----------------------------
A word of the native layout gives ``q - z`` for 8 consecutive k as four exact fp16x2 pairs
(kernels/nibbles.py); one ``mul.f16x2`` by the pair (s, s) then gives two weights ``(q - z) * s``,
each rounded once: bit for bit the reference's dequantized weight, because the product of exact
fp16 operands rounds once. That is ~1.6 instructions per weight before the MMA, where the first
version dequantized in fp32, packed back to fp16 and shuffled through shared memory (9-23).

The eight weights of a word sit in eight separate ``[R, BLOCK_N]`` tiles (k = 8r + j for tile j),
so the step is eight ``tl.dot`` of ``x[:, 8r + j]`` ``[BLOCK_M, R]`` with tile j ``[R, BLOCK_N]``: the
sum over k is the same, taken in another order, and no tile is reshaped.

bf16 activations (or bf16 scales) take the exact fp32 route ``((q - z) * s)`` rounded once to the
scales' dtype, then the dot in the activation dtype: correct, a little slower. Under the
interpreter bf16 dots are computed in fp32 (its bf16 ``tl.dot`` is wrong, triton issue 11584).

Algorithm
---------
Program ``(pid_m, pid_n, pid_k)`` owns the output tile ``[BLOCK_M, BLOCK_N]`` and the K steps
``pid_k, pid_k + SPLIT_K, ...`` of BLOCK_K = 8R rows::

    acc = 0                                                     # [BLOCK_M, BLOCK_N] fp32
    for each K step k0:
        words = qweight[k0/8 : k0/8 + R, n_tile]                # 128-bit loads
        z, s = zeros/scales of each row's group                 # one row when g >= BLOCK_K
        for j in 0..7:
            acc += dot(x[m_tile, k0 + 8r + j], (q_j - z) * s)  # fp16 operands, fp32 accumulator
    out[m_tile, n_tile] = acc (+ bias)                          # split-K protocol, kernels/common.py

Launch configuration (:func:`launch_config`, no autotuning): BLOCK_M = 16 up to M = 16, else 32 or
64; BLOCK_N = 128; BLOCK_K = 128 (R = 16, the k-depth of one fp16 MMA); 4 warps; one stage; and a
split of K that gives at least 4 programs per SM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (SPLIT_K_MAX_M, check_native_launch, is_interpreting, launch_buffers, sm_count, split_for,
                     write_tile)
from .native import NativeInt4
from .nibbles import codes_minus_zero, dequant_f16, load_scale_f32, load_scale_pair, load_zero

BLOCK_N = 128
BLOCK_K = 128
NUM_WARPS = 4


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = NUM_WARPS

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return triton.cdiv(m, self.block_m), triton.cdiv(n, self.block_n), self.split_k

    def ctas(self, m: int, n: int) -> int:
        a, b, c = self.grid(m, n)
        return a * b * c


def launch_config(m: int, n: int, k: int, group_size: int, sms: int) -> GemmConfig:
    """The configuration :func:`awq_gemm` launches for ``x [m, k] @ W^T [k, n]`` on ``sms`` SMs."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, BLOCK_N)
    split = split_for(tiles, triton.cdiv(k, BLOCK_K), sms, max_split=16) if m <= SPLIT_K_MAX_M else 1
    return GemmConfig(block_m, BLOCK_N, BLOCK_K, split)


@triton.jit
def _gemm_kernel(
    # tensors: x [M, K], native qweight int32 [K/8, N], zeros uint8 [K/g, N], scales [K/g, N],
    # bias [N] (ignored unless HAS_BIAS), out [M, N] in x.dtype; split-K scratch (kernels/common.py)
    x_ptr, qweight_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, ws_ptr, tickets_ptr,
    # sizes
    M, N, K,
    # row strides (every last dimension is contiguous)
    stride_xm, stride_qk, stride_zk, stride_sk, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    F16_ASM: tl.constexpr, W_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    R: tl.constexpr = BLOCK_K // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if EVEN_N:
        n_safe = offs_n[None, :]
    else:  # runs of 4 columns are all in or all out (N is a multiple of 8): keep 128-bit loads
        n_safe = tl.max_contiguous(tl.multiple_of(tl.where(n_ok, offs_n, 0), 4), 4)[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in tl.range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K, loop_unroll_factor=1):
        rows = k_start // 8 + offs_r
        if EVEN_K:
            r_safe = rows[:, None]
        else:
            r_safe = tl.where(rows < K // 8, rows, 0)[:, None]
        words = tl.load(qweight_ptr + r_safe * stride_qk + n_safe)            # [R, BLOCK_N]
        if GROUP_SIZE >= BLOCK_K:
            group = k_start // GROUP_SIZE + tl.zeros((1, 1), dtype=tl.int32)     # one group per step
        else:
            group = (r_safe * 8) // GROUP_SIZE                                 # [R, 1]
        zlo, zhi = load_zero(zeros_ptr + group * stride_zk + n_safe, USE_ASM)
        zlo = tl.broadcast_to(zlo, words.shape)
        zhi = tl.broadcast_to(zhi, words.shape)
        if F16_ASM:
            s_pair = tl.broadcast_to(load_scale_pair(scales_ptr + group * stride_sk + n_safe, USE_ASM), words.shape)
            w0, w1, w2, w3, w4, w5, w6, w7 = dequant_f16(words, zlo, zhi, s_pair, s_pair, USE_ASM)
        else:
            s = tl.broadcast_to(load_scale_f32(scales_ptr + group * stride_sk + n_safe, W_DTYPE == tl.bfloat16, USE_ASM),
                                words.shape)
            d0, d1, d2, d3, d4, d5, d6, d7 = codes_minus_zero(words, zlo, zhi, USE_ASM)
            w0 = (d0 * s).to(W_DTYPE)
            w1 = (d1 * s).to(W_DTYPE)
            w2 = (d2 * s).to(W_DTYPE)
            w3 = (d3 * s).to(W_DTYPE)
            w4 = (d4 * s).to(W_DTYPE)
            w5 = (d5 * s).to(W_DTYPE)
            w6 = (d6 * s).to(W_DTYPE)
            w7 = (d7 * s).to(W_DTYPE)
        k_ok = m_ok[:, None] & (rows < K // 8)[None, :]                        # [BLOCK_M, R]
        xk = x_rows + (k_start + 8 * offs_r)[None, :]                          # x[m, k0 + 8r]
        acc = tl.dot(tl.load(xk + 0, mask=k_ok, other=0.0).to(DOT_DTYPE), w0.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 1, mask=k_ok, other=0.0).to(DOT_DTYPE), w1.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 2, mask=k_ok, other=0.0).to(DOT_DTYPE), w2.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 3, mask=k_ok, other=0.0).to(DOT_DTYPE), w3.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 4, mask=k_ok, other=0.0).to(DOT_DTYPE), w4.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 5, mask=k_ok, other=0.0).to(DOT_DTYPE), w5.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 6, mask=k_ok, other=0.0).to(DOT_DTYPE), w6.to(DOT_DTYPE), acc)
        acc = tl.dot(tl.load(xk + 7, mask=k_ok, other=0.0).to(DOT_DTYPE), w7.to(DOT_DTYPE), acc)
    tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
    write_tile(acc, out_ptr, ws_ptr, tickets_ptr, bias_ptr, offs_m, offs_n, m_ok, N, stride_om, tile, HAS_BIAS, SPLIT_K)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def kernel_args(x: torch.Tensor, w: NativeInt4, bias, out, workspace, tickets, config: GemmConfig, use_asm: bool):
    """Positional and keyword arguments of :func:`_gemm_kernel` (shared with the compile report)."""
    m, k = x.shape
    f16 = x.dtype == torch.float16 and w.scales.dtype == torch.float16
    dot = _TL[x.dtype] if use_asm or x.dtype == torch.float16 else tl.float32  # interpreter: no bf16 dot
    args = (x, w.qweight, w.zeros, w.scales, bias if bias is not None else out, out, workspace, tickets,
            m, w.out_features, k, x.stride(0), w.qweight.stride(0), w.zeros.stride(0), w.scales.stride(0),
            out.stride(0))
    meta = dict(GROUP_SIZE=w.group_size, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, SPLIT_K=config.split_k, EVEN_K=k % config.block_k == 0,
                EVEN_N=w.out_features % config.block_n == 0, F16_ASM=f16, W_DTYPE=_TL[w.scales.dtype], DOT_DTYPE=dot,
                USE_ASM=use_asm, num_warps=config.num_warps, num_stages=1,
                enable_fp_fusion=True)  # x * d + acc as one FMA: the instruction budget counts on it
    return args, meta


def awq_gemm(x: torch.Tensor, w: NativeInt4, bias: torch.Tensor | None = None,
             config: GemmConfig | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with Triton for any M (tuned for 2..64) on a native weight
    (:func:`awq_nb.kernels.native.to_native`). ``x`` fp16/bf16 ``[M, K]``; returns ``[M, N]`` in
    ``x.dtype`` (fp32 accumulation). ``config`` overrides :func:`launch_config`."""
    k, n = check_native_launch("awq_gemm", x, w, bias)
    m = x.shape[0]
    config = config or launch_config(m, n, k, w.group_size, sm_count(x.device))
    out, workspace, tickets = launch_buffers(x, n)
    args, meta = kernel_args(x, w, bias, out, workspace, tickets, config, use_asm=not is_interpreting())
    _gemm_kernel[config.grid(m, n)](*args, **meta)
    return out
