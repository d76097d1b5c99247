"""Triton kernel: dequantize a native INT4 weight to a dense ``W^T [K, N]``.

Reference: :func:`awq_nb.kernels.reference.dequantize_ref` (the result matches it exactly).

Used for large batches (prefill): dequantize once, then let cuBLAS run the matmul. The kernel is
bound by memory traffic: it reads ~0.5 byte and writes 2 bytes per weight.

Program ``(pid_k, pid_n)`` reads the words of ``BLOCK_K / 8`` rows x ``BLOCK_N`` columns, turns
each into eight weights ``(q - z) * s`` (kernels/nibbles.py: exact fp16 with one rounding, or
fp32 rounded once to bf16) and stores weight j of word row r to output row ``8r + j``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from awq_nb.errors import AwqNbError

from .common import check_launchable, is_interpreting
from .native import NativeInt4, check_native
from .nibbles import codes_minus_zero, dequant_f16, load_scale_f32, load_scale_pair, load_zero

BLOCK_K, BLOCK_N, NUM_WARPS = 64, 128, 4


@triton.jit
def _store_row(out_rows, j: tl.constexpr, w, mask):
    tl.store(out_rows + j, w, mask=mask)


@triton.jit
def _dequantize_kernel(
    # tensors: native qweight int32 [K/8, N], zeros uint8 [K/g, N], scales [K/g, N], out [K, N]
    qweight_ptr, zeros_ptr, scales_ptr, out_ptr,
    K, N, stride_qk, stride_zk, stride_sk, stride_ok,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, F16_ASM: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K // 8)[:, None] & (offs_n < N)[None, :]
    r_safe = tl.where(rows < K // 8, rows, 0)[:, None]
    n_safe = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), 4), 4)[None, :]  # runs of 4 (N % 8 == 0)
    words = tl.load(qweight_ptr + r_safe * stride_qk + n_safe)
    group = (r_safe * 8) // GROUP_SIZE
    zlo, zhi = load_zero(zeros_ptr + group * stride_zk + n_safe, USE_ASM)
    if F16_ASM:
        s = load_scale_pair(scales_ptr + group * stride_sk + n_safe, USE_ASM)
        w0, w1, w2, w3, w4, w5, w6, w7 = dequant_f16(words, zlo, zhi, s, s, USE_ASM)
    else:
        s = load_scale_f32(scales_ptr + group * stride_sk + n_safe, out_ptr.dtype.element_ty == tl.bfloat16, USE_ASM)
        w0, w1, w2, w3, w4, w5, w6, w7 = codes_minus_zero(words, zlo, zhi, USE_ASM)
        w0, w1, w2, w3 = w0 * s, w1 * s, w2 * s, w3 * s
        w4, w5, w6, w7 = w4 * s, w5 * s, w6 * s, w7 * s
    out_rows = out_ptr + (r_safe * 8) * stride_ok + n_safe
    dtype = out_ptr.dtype.element_ty
    _store_row(out_rows, 0 * stride_ok, w0.to(dtype), mask)
    _store_row(out_rows, 1 * stride_ok, w1.to(dtype), mask)
    _store_row(out_rows, 2 * stride_ok, w2.to(dtype), mask)
    _store_row(out_rows, 3 * stride_ok, w3.to(dtype), mask)
    _store_row(out_rows, 4 * stride_ok, w4.to(dtype), mask)
    _store_row(out_rows, 5 * stride_ok, w5.to(dtype), mask)
    _store_row(out_rows, 6 * stride_ok, w6.to(dtype), mask)
    _store_row(out_rows, 7 * stride_ok, w7.to(dtype), mask)


def awq_dequantize(w: NativeInt4) -> torch.Tensor:
    """``W^T [K, N]`` in ``scales.dtype`` (fp16 or bf16) from a native weight, with Triton; equal to
    :func:`~awq_nb.kernels.reference.dequantize_ref` of the checkpoint tensors."""
    k, n = check_native(w)
    if w.scales.dtype not in (torch.float16, torch.bfloat16):
        raise AwqNbError(f"awq_dequantize takes float16/bfloat16 scales, got {w.scales.dtype}; "
                         "use awq_nb.kernels.dequantize_ref for float32.")
    check_launchable(w.qweight, "awq_dequantize")
    out = torch.empty((k, n), dtype=w.scales.dtype, device=w.device)
    args, meta = kernel_args(w, out, use_asm=not is_interpreting())
    _dequantize_kernel[(triton.cdiv(k, BLOCK_K), triton.cdiv(n, BLOCK_N))](*args, **meta)
    return out


def kernel_args(w: NativeInt4, out: torch.Tensor, use_asm: bool):
    """Positional and keyword arguments of :func:`_dequantize_kernel` (shared with the compile report)."""
    args = (w.qweight, w.zeros, w.scales, out, w.in_features, w.out_features, w.qweight.stride(0), w.zeros.stride(0),
            w.scales.stride(0), out.stride(0))
    meta = dict(GROUP_SIZE=w.group_size, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, F16_ASM=w.scales.dtype == torch.float16,
                USE_ASM=use_asm, num_warps=NUM_WARPS, num_stages=1, enable_fp_fusion=True)
    return args, meta
