"""``WQLinear``: a Linear whose weight is stored as AWQ "gemm" 4-bit tensors.

Buffers (K = in_features, N = out_features, g = group_size), named as in AutoAWQ checkpoints so
that ``state_dict()`` keys are the checkpoint's tensor names::

    qweight  int32 [K, N/8]     packed codes (awq_nb.packing)
    qzeros   int32 [K/g, N/8]   packed zero points
    scales   [K/g, N]           fp16 values; kept in the model's float dtype in memory
    bias     [N] or None

``forward(x [..., K]) -> [..., N]`` in ``x.dtype``, through :func:`awq_nb.kernels.dispatch.awq_matmul`
(on CPU, dequantize + matmul unless :meth:`WQLinear.prepare_cpu_int4` has converted the weight once
for torch's much faster int4 CPU kernel).

On CUDA the Triton kernels read the kernel-native layout (kernels/native.py).
:meth:`WQLinear.prepare_native` repacks once, on the GPU, and *replaces* ``qweight``/``qzeros`` by
the non-persistent buffers ``native_qweight [K/8, N]`` and ``native_zeros [K/g, N]`` (uint8): the
extra memory is the unpacked zeros only, 0.5 byte per group and column (under 1 % of a g = 128
layer). ``state_dict()`` rebuilds the AutoAWQ tensors from them, so checkpoints stay AutoAWQ
"gemm" byte for byte; :meth:`WQLinear.awq_tensors` gives them in either mode. ``load_quantized``
and ``from_linear`` on a CUDA weight prepare it; a CUDA forward of an unprepared module prepares it
on its first call; moving a prepared module to the CPU turns it back.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import find_quantizable, weight_nk
from .config import AWQConfig
from .kernels.layout import PACK_FACTOR
from .kernels.cpu import int4_cpu_supported, prepare_cpu_int4 as _prepare_cpu_int4
from .kernels.dispatch import awq_matmul, native_matmul
from .kernels.native import NativeInt4, from_native, native_supported, to_native
from .packing import check_format, check_packable, pack_codes
from .rounding import Rounded, codes_for, round_weight


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
        self.register_buffer("native_qweight", None, persistent=False)  # set by prepare_native
        self.register_buffer("native_zeros", None, persistent=False)
        self.cpu_weight = None  # set by prepare_cpu_int4; not saved, dropped when the buffers change

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, w_bit: int = 4, group_size: int = 128, zero_point: bool = True,
                    rounded: Rounded | None = None) -> "WQLinear":
        """Pack the current weight of an ``nn.Linear`` (or GPT-2 ``Conv1D``); bias and dtype are kept.

        The codes are ``rounded`` (e.g. ``AWQResult.rounded[name]`` from a ``rounding="gptq"``
        search) when given, else the weight rounded to nearest on the grid of
        :func:`awq_nb.quantizer.quant_params`."""
        w = weight_nk(linear)
        n, k = w.shape
        check_packable(n, k, w_bit, group_size, zero_point, name=type(linear).__name__)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float16
        if rounded is None:
            rounded = round_weight("rtn", w, w_bit, group_size, zero_point)
        r = rounded.check_fits(type(linear).__name__, (n, k), w_bit, group_size)
        packed = pack_codes(r.int_codes().to(w.device), r.scale.to(w.device), r.zero.to(w.device), group_size)
        bias = getattr(linear, "bias", None)
        m = cls(w_bit, group_size, k, n, bias is not None, device="meta", dtype=dtype)
        m.qweight, m.qzeros = packed.qweight, packed.qzeros
        m.scales = packed.scales.to(dtype)  # fp16-rounded values, exact in fp32; bf16 rounds them again
        if bias is not None:
            m.bias = bias.detach().clone().to(dtype)
        if m.qweight.device.type == "cuda":
            m.prepare_native()
        return m

    @property
    def is_native(self) -> bool:
        return self.native_qweight is not None

    def native(self) -> NativeInt4:
        """The weight in the kernel-native layout (after :meth:`prepare_native`)."""
        if not self.is_native:
            raise RuntimeError("WQLinear.native(): call prepare_native() first")
        return NativeInt4(self.native_qweight, self.native_zeros, self.scales, self.group_size)

    def awq_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qweight, qzeros, scales)`` in the AutoAWQ "gemm" layout, whichever layout the module holds."""
        if self.is_native:
            return from_native(self.native())
        return self.qweight, self.qzeros, self.scales

    @torch.no_grad()
    def prepare_native(self) -> bool:
        """Repack ``qweight``/``qzeros`` into the kernel-native layout, once, on their device, and
        drop the AutoAWQ-layout copies (see the module docstring). Returns False (and changes
        nothing) for group sizes that are not a multiple of 8."""
        if self.is_native:
            return True
        if not native_supported(self.in_features, self.group_size):
            return False
        w = to_native(self.qweight, self.qzeros, self.scales, self.group_size)
        self.native_qweight, self.native_zeros = w.qweight, w.zeros
        self.qweight = self.qzeros = None
        self.cpu_weight = None
        return True

    def _drop_native(self) -> None:
        """Back to the AutoAWQ-layout buffers (the state of a freshly built module)."""
        if self.is_native:
            self.qweight, self.qzeros, _ = from_native(self.native())
            self.native_qweight = self.native_zeros = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and not self.is_native:
            self.prepare_native()
        if self.is_native:
            return native_matmul(x, self.native(), self.bias)
        cpu_weight = self.cpu_weight if x.device.type == "cpu" else None
        return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias, cpu_weight=cpu_weight)

    def prepare_cpu_int4(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Convert the weight once for torch's int4 CPU kernel (``dtype`` bf16: fast, within bf16
        rounding; fp32: exact). Returns False (and changes nothing) where that kernel does not apply."""
        if self.scales.device.type != "cpu" or not int4_cpu_supported(self.out_features, self.group_size):
            return False
        self._drop_native()
        self.cpu_weight = _prepare_cpu_int4(self.qweight, self.qzeros, self.scales, self.group_size, dtype)
        return True

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): the converted weight is stale
        self.cpu_weight = None
        out = super()._apply(fn, *args, **kwargs)
        if self.is_native and self.native_qweight.device.type == "cpu":
            self._drop_native()  # the CPU paths read the AutoAWQ layout
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.is_native:  # rebuild the checkpoint tensors, in the usual key order
            qweight, qzeros, _ = from_native(self.native())
            destination[prefix + "qweight"] = qweight
            destination[prefix + "qzeros"] = qzeros
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self.cpu_weight = None
        if self.is_native:  # load into AutoAWQ-layout buffers; a CUDA forward repacks again
            device = self.native_qweight.device
            words = self.out_features // PACK_FACTOR
            self.qweight = torch.empty(self.in_features, words, dtype=torch.int32, device=device)
            self.qzeros = torch.empty(self.in_features // self.group_size, words, dtype=torch.int32, device=device)
            self.native_qweight = self.native_zeros = None
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


def prepare_native(model: nn.Module) -> int:
    """:meth:`WQLinear.prepare_native` on every WQLinear of ``model``; returns how many are native."""
    return sum(m.prepare_native() for m in model.modules() if isinstance(m, WQLinear))


def prepare_cpu_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """:meth:`WQLinear.prepare_cpu_int4` on every WQLinear of ``model``; returns how many were converted.
    Call it after loading and moving the model (moving drops the conversion)."""
    return sum(m.prepare_cpu_int4(dtype) for m in model.modules() if isinstance(m, WQLinear))


def replace_with_wqlinear(model: nn.Module, config: AWQConfig, rounded: dict | None = None) -> nn.Module:
    """Replace, in place, every quantizable Linear selected by :func:`select_modules` with a
    :class:`WQLinear` packed from its current weight, with the codes ``rounded[name]``
    (``AWQResult.rounded``) where given (:func:`awq_nb.rounding.codes_for`). Returns ``model``."""
    convert, _ = select_modules(model, config)
    for name, m in convert.items():
        r = codes_for(name, weight_nk(m), config, rounded)
        model.set_submodule(name, WQLinear.from_linear(m, config.w_bit, config.group_size, config.zero_point, rounded=r))
    return model
