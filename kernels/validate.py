"""Input checks shared by the references, the Triton wrappers and the dispatcher.

Each check raises :class:`awq_nb.errors.AwqNbError` naming the tensor at fault and the fix, so a
bad checkpoint or a wrong cast fails before any kernel launches (a Triton kernel reading out of
bounds would not fail loudly).
"""
from __future__ import annotations

import torch

from awq_nb.errors import AwqNbError

from .layout import PACK_FACTOR

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    """Check one AWQ "gemm" Linear and return ``(K, N)`` (in_features, out_features).

    Expects ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/g, N/8]``, ``scales`` float
    ``[K/g, N]``, all on one device, with ``g = group_size`` a positive divisor of K.
    """
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise AwqNbError(f"{name} must be int32 (eight packed 4-bit values per word), got {t.dtype}; "
                             "load the checkpoint tensor without casting it.")
        if t.dim() != 2:
            raise AwqNbError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if scales.dtype not in SCALE_DTYPES:
        raise AwqNbError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if scales.dim() != 2:
        raise AwqNbError(f"scales must be 2-D [K/group_size, N], got shape {tuple(scales.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise AwqNbError(f"group_size={group_size!r} does not divide in_features K={k} (qweight rows); "
                         "pass the group_size from the checkpoint's quantization_config (usually 128).")
    groups = k // group_size
    if tuple(scales.shape) != (groups, n):
        raise AwqNbError(f"scales has shape {tuple(scales.shape)} but qweight {tuple(qweight.shape)} with "
                         f"group_size={group_size} needs [K/g, N] = [{groups}, {n}]; check group_size and that "
                         "the checkpoint is the 'gemm' version (not 'gemv').")
    if tuple(qzeros.shape) != (groups, n // PACK_FACTOR):
        raise AwqNbError(f"qzeros has shape {tuple(qzeros.shape)}, expected [K/g, N/8] = "
                         f"[{groups}, {n // PACK_FACTOR}] for qweight {tuple(qweight.shape)} and group_size={group_size}")
    if not (qweight.device == qzeros.device == scales.device):
        raise AwqNbError(f"qweight ({qweight.device}), qzeros ({qzeros.device}) and scales ({scales.device}) "
                         "must be on one device; move them together with .to(device).")
    return k, n


def check_activation(x: torch.Tensor, k: int, device: torch.device, bias: torch.Tensor | None = None, n: int | None = None) -> None:
    """Check activations ``x [M, K]`` (float16/bfloat16/float32) and an optional ``bias [N]``."""
    if x.dim() != 2:
        raise AwqNbError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}; flatten leading dims with "
                         "x.reshape(-1, x.shape[-1]).")
    if x.shape[1] != k:
        raise AwqNbError(f"x has {x.shape[1]} features but the quantized weight expects K={k}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise AwqNbError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != device:
        raise AwqNbError(f"x is on {x.device} but the quantized weight is on {device}; move one of them.")
    if bias is not None:
        if bias.dim() != 1 or (n is not None and bias.shape[0] != n):
            raise AwqNbError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
        if bias.device != device:
            raise AwqNbError(f"bias is on {bias.device} but the quantized weight is on {device}")
