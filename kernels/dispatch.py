"""``awq_matmul``: one entry point that picks the INT4 matmul strategy from the batch size.

CUDA (thresholds from the H200 run of 2026-11-28, docs/gpu-runs/2026-11-28-h200.md: at M = 2..8
the tl.dot GEMM beat the GEMV on 8 of 8 shapes, at M = 16..64 on 7 of 8, and from M = 128 on
dequantize + cuBLAS won 7-8 of 8; re-measure with ``bench/gpu_check.sh`` after kernel changes)::

    M <= GEMV_MAX_M            -> kernels/gemv.py   (broadcast + tl.sum, weight-bandwidth bound)
    M <= GEMM_MAX_M            -> kernels/gemm.py   (tl.dot, dequantized in registers, split-K)
    M >  GEMM_MAX_M            -> kernels/dequant.py + torch.matmul (cuBLAS is compute bound there)

On GPUs below compute capability 8.0 (T4), Triton >= 3.3 has no tensor-core ``tl.dot``, so the
fused GEMM is skipped: GEMV up to GEMV_MAX_M, dequantize + cuBLAS above.

CPU (measured here, see docs/kernels.md)::

    cpu_weight given           -> torch's int4 kernel (kernels/cpu.py), bf16 compute
    otherwise                  -> dequantize in float32 + torch.addmm (stateless, slow)

Triton is imported only when a CUDA tensor arrives, so the CPU path works without it.
"""
from __future__ import annotations

import torch

from awq_nb.errors import AwqNbError

from .cpu import CpuInt4Weight, matmul_dequant_cpu, matmul_int4_cpu
from .validate import check_activation, check_awq_weight

GEMV_MAX_M = 1            # largest batch sent to the GEMV kernel (measured, H200 2026-11-28)
GEMM_MAX_M = 64           # largest batch sent to the fused tl.dot GEMM (measured, H200 2026-11-28)
MIN_MMA_CAPABILITY = (8, 0)  # Triton >= 3.3 emits tensor-core tl.dot only from sm80 on

GEMV, GEMM, DEQUANT_MATMUL = "gemv", "gemm", "dequant+matmul"
CPU_INT4, CPU_DEQUANT_MATMUL = "cpu-int4", "cpu-dequant+matmul"


def choose_kernel(m: int, device: torch.device, has_cpu_weight: bool = False) -> str:
    """Name of the strategy ``awq_matmul`` uses for ``m`` rows on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_INT4 if has_cpu_weight else CPU_DEQUANT_MATMUL
    if device.type != "cuda":
        raise AwqNbError(f"awq_matmul runs on CPU or CUDA tensors, got {device}")
    return cuda_strategy(m, torch.cuda.get_device_capability(device))


def cuda_strategy(m: int, capability: tuple[int, int]) -> str:
    """The CUDA rule of :func:`choose_kernel` for ``m`` rows on a GPU of compute ``capability``."""
    if m <= GEMV_MAX_M:
        return GEMV
    if m <= GEMM_MAX_M and tuple(capability) >= MIN_MMA_CAPABILITY:
        return GEMM
    return DEQUANT_MATMUL


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, cpu_weight: CpuInt4Weight | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for an AWQ "gemm" weight, with the fastest strategy for ``x``'s rows and device.

    Args:
        x: fp16/bf16/fp32 ``[..., K]`` (leading dimensions are flattened into M and restored).
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: fp16/bf16 ``[K/g, N]``.
        group_size: ``g``.
        bias: optional ``[N]``.
        cpu_weight: on CPU, the same weight converted once by
            :func:`awq_nb.kernels.cpu.prepare_cpu_int4` (much faster; results within bf16 rounding).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    check_activation(x2, k, qweight.device, bias, n)
    kind = choose_kernel(x2.shape[0], x2.device, cpu_weight is not None)
    if kind == CPU_INT4:
        if (cpu_weight.in_features, cpu_weight.out_features, cpu_weight.group_size) != (k, n, group_size):
            raise AwqNbError(f"cpu_weight is for a [{cpu_weight.in_features} -> {cpu_weight.out_features}] layer with "
                             f"group_size={cpu_weight.group_size}, but qweight is [{k} -> {n}] with "
                             f"group_size={group_size}; prepare it from this layer's tensors.")
        out = matmul_int4_cpu(x2, cpu_weight, bias)
    elif kind == CPU_DEQUANT_MATMUL:
        out = matmul_dequant_cpu(x2, qweight, qzeros, scales, group_size, bias)
    else:
        out = _cuda_matmul(kind, x2, qweight, qzeros, scales, group_size, bias)
    return out.reshape(*lead, n)


def _cuda_matmul(kind, x, qweight, qzeros, scales, group_size, bias):
    """Run a Triton strategy; fp32 activations are computed in the scales' dtype."""
    compute = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(scales.dtype)
    if kind == GEMV:
        from .gemv import awq_gemv
        out = awq_gemv(compute, qweight, qzeros, scales, group_size, bias)
    elif kind == GEMM:
        from .gemm import awq_gemm
        out = awq_gemm(compute, qweight, qzeros, scales, group_size, bias)
    else:
        from .dequant import awq_dequantize
        w = awq_dequantize(qweight, qzeros, scales, group_size).to(compute.dtype)
        out = compute @ w if bias is None else torch.addmm(bias.to(compute.dtype), compute, w)
    return out.to(x.dtype)
