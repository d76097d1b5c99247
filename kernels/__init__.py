"""Triton INT4 kernels and their torch references, importable as ``awq_nb.kernels``.

This folder is mapped to ``awq_nb.kernels`` by pyproject.toml; it is never a top-level
``kernels`` package (that name belongs to a PyPI package that transformers probes for).
Nothing heavy is imported here: the names below load their module on first access, and triton
is imported only by the Triton kernel modules (``dequant``, ``gemm``, ``gemv``, ``common``).

Stable API::

    awq_matmul(x, qweight, qzeros, scales, group_size, bias=None, *, cpu_weight=None, native=None)  # dispatch
    native_matmul(x, native, bias=None)                                # dispatch, native weight (CUDA)
    choose_kernel(m, device, has_cpu_weight=False) -> str
    to_native(qweight, qzeros, scales, group_size) -> NativeInt4       # the kernel layout, once at load
    from_native(native) -> (qweight, qzeros, scales)                   # back, bit for bit
    awq_dequantize(native) -> W^T [K, N]                               # Triton
    awq_gemm(x, native, bias=None)                                     # Triton, tensor cores, M 2..64
    awq_gemv(x, native, bias=None)                                     # Triton, M <= 8
    dequantize_ref(...), gemm_ref(...)                                 # torch references (AutoAWQ tensors)
    prepare_cpu_int4(...) -> CpuInt4Weight, matmul_int4_cpu(x, w, bias=None)
    AWQ_ORDER, AWQ_REVERSE_ORDER, pack_awq(values), unpack_awq(packed)
"""
import importlib

_EXPORTS = {
    "awq_matmul": "dispatch", "choose_kernel": "dispatch", "native_matmul": "dispatch",
    "NativeInt4": "native", "to_native": "native", "from_native": "native", "native_supported": "native",
    "awq_dequantize": "dequant", "awq_gemm": "gemm", "awq_gemv": "gemv",
    "dequantize_ref": "reference", "gemm_ref": "reference",
    "CpuInt4Weight": "cpu", "prepare_cpu_int4": "cpu", "matmul_int4_cpu": "cpu", "int4_cpu_supported": "cpu",
    "GEMV_MAX_M": "dispatch", "GEMM_MAX_M": "dispatch",
    "AWQ_ORDER": "layout", "AWQ_REVERSE_ORDER": "layout", "pack_awq": "layout", "unpack_awq": "layout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
