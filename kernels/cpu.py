"""CPU paths for AWQ matmuls (no Triton): on-the-fly dequantization, and torch's int4 CPU kernel.

Measured on this project's 2-core CPU box (docs/kernels.md): dequantizing a 4096x4096 layer costs
hundreds of milliseconds per call, while torch's own int4 kernel
(``aten._weight_int4pack_mm_for_cpu``) runs the same layer at batch 1 in well under 1 ms in
bf16. So a module that runs on CPU should convert its weight once with
:func:`prepare_cpu_int4` and pass the result to ``awq_matmul(..., cpu_weight=...)``.

Mapping AWQ onto torch's int4 format
------------------------------------
torch's kernel takes the codes ``q`` as int32 ``[N, K]`` (converted by
``aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)`` into uint8 ``[N, K/2]``) and one
``scale_and_zero [K/g, N, 2]`` tensor, and dequantizes with a *float* zero around the midpoint 8::

    w = (q - 8) * scale + zero

AWQ stores an integer zero ``z``: ``w = (q - z) * s = (q - 8) * s + (8 - z) * s``. Hence::

    scale_and_zero[..., 0] = s
    scale_and_zero[..., 1] = (8 - z) * s

which is exact in float32 (tests check it against the reference to float32 rounding). In bf16,
the fast dtype on CPU, ``s`` and ``(8 - z) * s`` are rounded to bf16 (8 significant bits), so each
weight moves by at most ``~2**-8 * 16 * s``, under a tenth of the 4-bit quantization noise.
torch's kernel needs ``N % 16 == 0`` and a group size of 32, 64, 128 or 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_nb.errors import AwqNbError

from .layout import unpack_awq
from .validate import check_activation, check_awq_weight

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
INT4_N_MULTIPLE = 16                   # and N must be a multiple of this
INT4_MIDPOINT = 8                      # its codes are centred on 8: w = (q - 8) * scale + zero
INT4_DTYPES = (torch.bfloat16, torch.float32)  # bf16 is the fast one; fp32 is exact but slow
_INNER_K_TILES = 1                     # ignored by the CPU conversion, required by its signature


def dequantize_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W^T [K, N]`` in ``dtype``, computed without materialising per-row zeros or scales.

    Same values as :func:`~awq_nb.kernels.reference.dequantize_ref` before its final rounding to
    ``scales.dtype`` (in float32 the two differ by at most half an ulp of ``scales.dtype``).
    """
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    groups = k // group_size
    q = unpack_awq(qweight).view(groups, group_size, n)
    z = unpack_awq(qzeros).view(groups, 1, n)
    return ((q - z).to(dtype) * scales.to(dtype).unsqueeze(1)).view(k, n)


def matmul_dequant_cpu(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Stateless CPU path: dequantize to float32, ``torch.addmm``, back to ``x.dtype``. ``x [M, K]``."""
    w = dequantize_cpu(qweight, qzeros, scales, group_size, torch.float32)
    out = x.float() @ w if bias is None else torch.addmm(bias.float(), x.float(), w)
    return out.to(x.dtype)


@dataclass(frozen=True)
class CpuInt4Weight:
    """An AWQ weight converted once for ``aten._weight_int4pack_mm_for_cpu``.

    Attributes:
        packed: uint8 ``[N, K/2]`` from ``aten._convert_weight_to_int4pack_for_cpu``.
        scale_and_zero: ``[K/g, N, 2]`` in ``dtype``: ``(s, (8 - z) * s)``.
        group_size: ``g``.
        in_features, out_features: ``K`` and ``N``.
    """

    packed: torch.Tensor
    scale_and_zero: torch.Tensor
    group_size: int
    in_features: int
    out_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_and_zero.dtype


def int4_cpu_supported(out_features: int, group_size: int) -> bool:
    """Whether torch's int4 CPU kernel takes this layer (``N % 16 == 0`` and g in 32/64/128/256)."""
    return out_features % INT4_N_MULTIPLE == 0 and group_size in INT4_GROUP_SIZES


def prepare_cpu_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.bfloat16) -> CpuInt4Weight:
    """Convert a CPU AWQ weight (``qweight [K, N/8]``, ``qzeros [K/g, N/8]``, ``scales [K/g, N]``) once."""
    k, n = check_awq_weight(qweight, qzeros, scales, group_size)
    if qweight.device.type != "cpu":
        raise AwqNbError(f"prepare_cpu_int4 converts CPU weights, got qweight on {qweight.device}; "
                         "on a GPU call awq_matmul without cpu_weight.")
    if not int4_cpu_supported(n, group_size):
        raise AwqNbError(f"torch's int4 CPU kernel needs out_features % {INT4_N_MULTIPLE} == 0 and group_size in "
                         f"{INT4_GROUP_SIZES}, got N={n}, group_size={group_size}; use awq_matmul without "
                         "cpu_weight (dequantize + matmul) for this layer.")
    if dtype not in INT4_DTYPES:
        raise AwqNbError(f"prepare_cpu_int4: dtype must be one of {INT4_DTYPES}, got {dtype}")
    q = unpack_awq(qweight).t().contiguous()             # [N, K] codes 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
    s = scales.float()                                        # [K/g, N]
    z = unpack_awq(qzeros).float()                       # [K/g, N]
    scale_and_zero = torch.stack([s, (INT4_MIDPOINT - z) * s], dim=-1).to(dtype).contiguous()
    return CpuInt4Weight(packed, scale_and_zero, group_size, k, n)


def matmul_int4_cpu(x: torch.Tensor, weight: CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` with torch's int4 CPU kernel; computes in ``weight.dtype``, returns ``x.dtype``."""
    check_activation(x, weight.in_features, weight.packed.device, bias, weight.out_features)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(weight.dtype), weight.packed, weight.group_size,
                                                      weight.scale_and_zero)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)
