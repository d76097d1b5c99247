"""``WQLinear``: a Linear whose weight is stored as AWQ "gemm" 4-bit tensors.

Buffers (K = in_features, N = out_features, g = group_size), named as in AutoAWQ checkpoints so
that ``state_dict()`` keys are the checkpoint's tensor names::

    qweight  int32 [K, N/8]     packed codes (awq_nb.packing)
    qzeros   int32 [K/g, N/8]   packed zero points
    scales   [K/g, N]           fp16 values; kept in the model's float dtype in memory
    bias     [N] or None

``forward(x [..., K]) -> [..., N]`` in ``x.dtype``, through the kernels' matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import find_quantizable, weight_nk
from .config import AWQConfig
from .errors import AwqNbError
from .kernels.layout import PACK_FACTOR
from .kernels.reference import gemm_ref as awq_matmul
from .packing import check_format, check_packable, pack_linear
from .quantizer import quant_params


class WQLinear(nn.Module):
    """A 4-bit AWQ Linear (asymmetric, group-wise). Build it with :meth:`from_linear`."""

    def __init__(self, w_bit: int, group_size: int, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float16):
        super().__init__()
        check_packable(out_features, in_features, w_bit, group_size)
        self.w_bit, self.group_size = w_bit, group_size
        self.in_features, self.out_features = in_features, out_features
        groups, words = in_features // group_size, out_features // PACK_FACTOR
        self.register_buffer("qweight", torch.zeros(in_features, words, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, w_bit: int = 4, group_size: int = 128, zero_point: bool = True) -> "WQLinear":
        """Quantize the current weight of an ``nn.Linear`` (or GPT-2 ``Conv1D``) with
        :func:`awq_nb.quantizer.quant_params` and pack it; bias and dtype are kept."""
        w = weight_nk(linear)
        n, k = w.shape
        check_packable(n, k, w_bit, group_size, zero_point, name=type(linear).__name__)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float16
        scale, zero = quant_params(w, w_bit, group_size, zero_point)
        packed = pack_linear(w, scale, zero, group_size, w_bit)
        bias = getattr(linear, "bias", None)
        m = cls(w_bit, group_size, k, n, bias is not None, device="meta", dtype=dtype)
        m.qweight, m.qzeros = packed.qweight, packed.qzeros
        m.scales = packed.scales.to(dtype)  # fp16-rounded values, exact in fp32; bf16 rounds them again
        if bias is not None:
            m.bias = bias.detach().clone().to(dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = awq_matmul(x.reshape(-1, self.in_features), self.qweight, self.qzeros, self.scales, self.group_size,
                         self.bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w_bit={self.w_bit}, group_size={self.group_size}")


def matches_any(name: str, patterns: list[str] | None) -> bool:
    """Whether module ``name`` is excluded by ``modules_to_not_convert``: a pattern matches when it
    is a substring of the full name (AutoAWQ's and vLLM's rule; covers transformers' prefix/suffix rules)."""
    return any(p in name for p in patterns or ())


def select_modules(model: nn.Module, config: AWQConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """Split ``find_quantizable(model)`` into ``(to_convert, kept_fp)`` by full name.

    Kept in floating point: names matching ``config.modules_to_not_convert``, and with
    ``config.skip_indivisible`` the Linears whose shapes the "gemm" format cannot hold. Any other
    unrepresentable Linear (or setting) raises :class:`AwqNbError` naming it.
    """
    check_format(config.w_bit, config.group_size, config.zero_point, name=f"AWQConfig({config.tag})")
    convert, kept = {}, []
    for name, m in find_quantizable(model).items():
        if matches_any(name, config.modules_to_not_convert):
            kept.append(name)
            continue
        n, k = weight_nk(m).shape
        if config.skip_indivisible and (k % config.group_size or n % PACK_FACTOR):
            kept.append(name)
            continue
        check_packable(n, k, config.w_bit, config.group_size, config.zero_point, name=name)
        convert[name] = m
    return convert, kept


def replace_with_wqlinear(model: nn.Module, config: AWQConfig) -> nn.Module:
    """Replace, in place, every quantizable Linear selected by :func:`select_modules` with a
    :class:`WQLinear` quantized from its current weight. Returns ``model``."""
    convert, _ = select_modules(model, config)
    for name, m in convert.items():
        model.set_submodule(name, WQLinear.from_linear(m, config.w_bit, config.group_size, config.zero_point))
    return model
