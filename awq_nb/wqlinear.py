"""``WQLinear``: a Linear whose weight is stored as AWQ "gemm" 4-bit tensors.

Buffers (K = in_features, N = out_features, g = group_size), named as in AutoAWQ checkpoints so
that ``state_dict()`` keys are the checkpoint's tensor names::

    qweight  int32 [K, N/8]     packed codes (awq_nb.packing)
    qzeros   int32 [K/g, N/8]   packed zero points
    scales   [K/g, N]           fp16 values; kept in the model's float dtype in memory
    bias     [N] or None

``forward(x [..., K]) -> [..., N]`` in ``x.dtype``, through :func:`awq_nb.kernels.dispatch.awq_matmul`
(Triton kernels on CUDA; on CPU, dequantize + matmul unless :meth:`WQLinear.prepare_cpu_int4` has
converted the weight once for torch's much faster int4 CPU kernel).
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import find_quantizable, weight_nk
from .config import AWQConfig
from .kernels.layout import PACK_FACTOR
from .kernels.cpu import int4_cpu_supported, prepare_cpu_int4 as _prepare_cpu_int4
from .kernels.dispatch import awq_matmul
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
        self.cpu_weight = None  # set by prepare_cpu_int4; not saved, dropped when the buffers change

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
        cpu_weight = self.cpu_weight if x.device.type == "cpu" else None
        return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias, cpu_weight=cpu_weight)

    def prepare_cpu_int4(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Convert the weight once for torch's int4 CPU kernel (``dtype`` bf16: fast, within bf16
        rounding; fp32: exact). Returns False (and changes nothing) where that kernel does not apply."""
        if self.qweight.device.type != "cpu" or not int4_cpu_supported(self.out_features, self.group_size):
            return False
        self.cpu_weight = _prepare_cpu_int4(self.qweight, self.qzeros, self.scales, self.group_size, dtype)
        return True

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): the converted weight is stale
        self.cpu_weight = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.cpu_weight = None
        super()._load_from_state_dict(*args, **kwargs)

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


def prepare_cpu_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """:meth:`WQLinear.prepare_cpu_int4` on every WQLinear of ``model``; returns how many were converted.
    Call it after loading and moving the model (moving drops the conversion)."""
    return sum(m.prepare_cpu_int4(dtype) for m in model.modules() if isinstance(m, WQLinear))


def replace_with_wqlinear(model: nn.Module, config: AWQConfig) -> nn.Module:
    """Replace, in place, every quantizable Linear selected by :func:`select_modules` with a
    :class:`WQLinear` quantized from its current weight. Returns ``model``."""
    convert, _ = select_modules(model, config)
    for name, m in convert.items():
        model.set_submodule(name, WQLinear.from_linear(m, config.w_bit, config.group_size, config.zero_point))
    return model
