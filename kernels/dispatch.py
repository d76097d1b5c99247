"""``awq_matmul``: one entry point that picks the INT4 matmul strategy from the batch size.

CUDA: the Triton kernels read the kernel-native layout (kernels/native.py), which a
``WQLinear`` makes once when it lands on the GPU and passes as ``native=``; without it each call
repacks the weight first (correct, but slow)::

    M <= GEMV_MAX_M            -> kernels/gemv.py   (no tensor cores, weight-bandwidth bound)
    M <= GEMM_MAX_M            -> kernels/gemm.py   (tl.dot on fp16 dequantized in registers, split-K)
    M >  GEMM_MAX_M            -> kernels/dequant.py + torch.matmul (cuBLAS is compute bound there)

The thresholds follow the H200 run of 2026-11-28 (docs/gpu-runs/2026-11-28-h200.md: the tl.dot
GEMM won M = 2..64, dequantize + cuBLAS from M = 128) and await a run of the native kernels
(``bench/gpu_quick.py``). On GPUs below compute capability 8.0 (T4), Triton >= 3.3 has no
tensor-core ``tl.dot``, so the GEMV serves up to its 8 rows and dequantize + cuBLAS the rest.
Group sizes that are not a multiple of 8 have no native layout: they dequantize in torch.

CPU (measured here, see docs/kernels.md)::

    cpu_weight given           -> torch's int4 kernel (kernels/cpu.py), bf16 compute
    otherwise                  -> dequantize in float32 + torch.addmm (stateless, slow)

Triton is imported only when a CUDA tensor arrives, so the CPU path works without it.
"""
from __future__ import annotations

import importlib.util

import torch

from awq_nb.errors import AwqNbError

from .cpu import CpuInt4Weight, matmul_dequant_cpu, matmul_int4_cpu
from .native import NativeInt4, check_native, dequantize_native, native_supported, to_native
from .validate import check_activation, check_awq_weight

GEMV_MAX_M = 1            # largest batch sent to the GEMV kernel on sm80+ (H200 2026-11-28)
GEMV_MAX_M_NO_MMA = 8     # below sm80 the GEMV (its row limit) is the only fused kernel
GEMM_MAX_M = 64           # largest batch sent to the fused tl.dot GEMM (H200 2026-11-28)
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
    mma = tuple(capability) >= MIN_MMA_CAPABILITY
    if m <= (GEMV_MAX_M if mma else GEMV_MAX_M_NO_MMA):
        return GEMV
    if m <= GEMM_MAX_M and mma:
        return GEMM
    return DEQUANT_MATMUL


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, cpu_weight: CpuInt4Weight | None = None,
               native: NativeInt4 | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for an AWQ "gemm" weight, with the fastest strategy for ``x``'s rows and device.

    Args:
        x: fp16/bf16/fp32 ``[..., K]`` (leading dimensions are flattened into M and restored).
        qweight: int32 ``[K, N/8]``; qzeros: int32 ``[K/g, N/8]``; scales: fp16/bf16 ``[K/g, N]``.
        group_size: ``g``.
        bias: optional ``[N]``.
        cpu_weight: on CPU, the same weight converted once by
            :func:`awq_nb.kernels.cpu.prepare_cpu_int4` (much faster; results within bf16 rounding).
        native: on CUDA, the same weight in the kernel-native layout
            (:func:`awq_nb.kernels.native.to_native`, made once); without it each call repacks.

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
    elif not native_supported(k, group_size) or scales.dtype == torch.float32:
        out = matmul_dequant_cpu(x2, qweight, qzeros, scales, group_size, bias)  # plain torch, any device
    else:
        out = _cuda_matmul(kind, x2, native if native is not None else to_native(qweight, qzeros, scales, group_size),
                           bias)
    return out.reshape(*lead, n)


def native_matmul(x: torch.Tensor, w: NativeInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a native weight on CUDA (or CPU tensors under TRITON_INTERPRET=1),
    with the strategy :func:`choose_kernel` picks for ``x``'s rows. ``x`` is ``[..., K]``."""
    k, n = check_native(w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    check_activation(x2, k, w.device, bias, n)
    if x2.device.type == "cpu":
        kind = cuda_strategy(x2.shape[0], (9, 0))  # the interpreter runs the sm90 rule
    else:
        kind = choose_kernel(x2.shape[0], x2.device)
    return _cuda_matmul(kind, x2, w, bias).reshape(*lead, n)


def triton_available() -> bool:
    """Whether triton can be imported here (not on macOS or Windows); checked at call time."""
    return importlib.util.find_spec("triton") is not None


def _cuda_matmul(kind, x, w: NativeInt4, bias):
    """Run a Triton strategy; fp32 activations are computed in the scales' dtype. Without triton
    (a CUDA GPU on Windows) the weight is dequantized in torch and cuBLAS multiplies."""
    compute = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(w.scales.dtype)
    if not triton_available():
        wt = dequantize_native(w, compute.dtype)
        out = compute @ wt if bias is None else torch.addmm(bias.to(compute.dtype), compute, wt)
    elif kind == GEMV:
        from .gemv import awq_gemv
        out = awq_gemv(compute, w, bias)
    elif kind == GEMM:
        from .gemm import awq_gemm
        out = awq_gemm(compute, w, bias)
    else:
        from .dequant import awq_dequantize
        wt = awq_dequantize(w).to(compute.dtype)
        out = compute @ wt if bias is None else torch.addmm(bias.to(compute.dtype), compute, wt)
    return out.to(x.dtype)
