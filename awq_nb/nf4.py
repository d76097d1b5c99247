"""NF4 ("4-bit NormalFloat", QLoRA: Dettmers et al., 2023), the format AWQ is compared with in notebook 06.

NF4 assumes weights are roughly normal. Its 16 levels ``c`` are quantiles of N(0, 1) normalised
to [-1, 1], with an exact zero: 8 positive levels ``Phi^-1(p_i)`` for ``p_i`` evenly spaced from
``p_max`` down to 1/2 (excluded), 7 negative ones likewise, then division by the largest. With
``p_max = 1 - (1/32 + 1/30) / 2`` this gives the published table. Each block of :data:`BLOCK`
consecutive weights stores its absolute maximum ``m`` (fp32) and, per weight, the 4-bit index of
the nearest level::

    w_hat = m * c[i*],   i* = argmin_i |w / m - c_i|

:func:`fake_quantize` rounds in torch (quantize + dequantize: the weight stays floating point),
so its perplexity is NF4's on any device; it is written for this project from the formulas
above, not taken from bitsandbytes. :func:`load_bitsandbytes` loads the real thing (bitsandbytes'
CUDA kernels) for speed measurements on a GPU.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from .errors import AwqNbError

BLOCK = 64                           # weights per absmax block (bitsandbytes' default blocksize for NF4)
P_MAX = 1 - 0.5 * (1 / 32 + 1 / 30)  # the largest quantile: gives the published table
CODE_BITS = 4
ABSMAX_BYTES = 4                     # one fp32 absmax per block


def levels(p_max: float = P_MAX) -> torch.Tensor:
    """The 16 NF4 levels, ascending, fp32 ``[16]``: -1, ..., 0, ..., 1 (module docstring)."""
    quantile = torch.special.ndtri
    positive = quantile(torch.linspace(p_max, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -quantile(torch.linspace(p_max, 0.5, 8, dtype=torch.float64)[:-1])
    table = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (table / table.abs().max()).float()


def fake_quantize(w: torch.Tensor, block: int = BLOCK, table: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` (any shape and float dtype, ``numel`` a multiple of ``block``) rounded to NF4: each
    block of ``block`` consecutive weights (in memory order, as bitsandbytes) scaled by its absmax
    and snapped to the nearest of the ``table`` levels (default :func:`levels`). Returns a new
    tensor of ``w``'s shape, dtype and device; computed in fp32. An all-zero block stays zero."""
    if w.numel() % block:
        raise AwqNbError(f"NF4 blocks of {block}: a weight of shape {tuple(w.shape)} ({w.numel()} values) does not "
                         f"split into them; pass a block that divides {w.numel()}.")
    table = (levels() if table is None else table).to(device=w.device, dtype=torch.float32)
    blocks = w.detach().float().reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    nearest = (scaled.unsqueeze(-1) - table).abs().argmin(-1)
    return (table[nearest] * absmax).reshape(w.shape).to(w.dtype)


def linear_bytes(n_out: int, k: int, block: int = BLOCK) -> int:
    """Bytes of one Linear weight ``[n_out, k]`` stored in NF4: 4-bit codes plus an fp32 absmax per
    block (4.5 bits per weight with blocks of 64). For :func:`awq_nb.evaluate.model_size_bytes`."""
    numel = n_out * k
    return math.ceil(numel * CODE_BITS / 8) + math.ceil(numel / block) * ABSMAX_BYTES


def load_bitsandbytes(model: str, device: str = "cuda", skip: tuple[str, ...] | list[str] = ("lm_head",),
                      compute_dtype: torch.dtype = torch.float16):
    """The real NF4: ``model`` (a bundled name, hub id or folder) loaded by transformers with
    bitsandbytes' 4-bit NF4 Linears (CUDA only); the modules named in ``skip`` stay floating point."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AwqNbError("real NF4 needs bitsandbytes and a CUDA GPU: pip install bitsandbytes; without them, "
                         "awq_nb.nf4.fake_quantize emulates its rounding.")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .models import resolve_model_path

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                llm_int8_skip_modules=list(skip))
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model), quantization_config=config, device_map=device)
