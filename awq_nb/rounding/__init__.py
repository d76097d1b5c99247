"""The last step of quantization: turning a Linear's (scaled, clipped) weight into integer codes.

Every method has one interface. It takes

- ``w [N, K]``: the weight after AWQ's scaling and clipping (any float dtype; computed in fp32),
- the group parameters ``scale``/``zero [N, K/g]`` that :func:`awq_nb.quantizer.quant_params`
  gives for that weight (so the grid spans the clipped range the clip search chose),
- when the method needs it (:attr:`Rounder.needs_gram`), the Gram matrix ``X^T X [K, K]`` of the
  input the weight sees,

and returns a :class:`Rounded`: the codes, scales and zeros as data. ``fake_quantize``,
``save_quantized`` and ``WQLinear.from_linear`` consume a :class:`Rounded` as it is; nothing
downstream rounds again.

Methods (the registry :data:`ROUNDERS`):

- ``"rtn"`` (:mod:`.rtn`): round to nearest, each weight on its own (AWQ as published).
- ``"gptq"`` (:mod:`.gptq`): column by column, each column's rounding error pushed onto the
  columns not yet rounded through the inverse Gram matrix (GPTQ), on the AWQ grid.

A new method is one module with a ``round_weight(w, scale, zero, bits, group_size, gram)``
function (with ``needs_gram``, also a ``factors`` keyword: see :func:`round_weight`) and one
:func:`register` line below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..errors import AwqNbError
from ..quantizer import dequantize_int, quant_params


@dataclass
class Rounded:
    """A quantized weight as data: ``codes`` uint8 ``[N, K]`` (0..2**bits-1 with a zero point,
    stored with an offset of ``2**(bits-1)`` without one), ``scale`` fp32 ``[N, K/g]``, ``zero``
    fp32 ``[N, K/g]`` or None (symmetric), and the format they belong to."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    method: str = "rtn"

    def __post_init__(self):
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise AwqNbError(f"Rounded.codes must be uint8 [N, K], got {self.codes.dtype} {tuple(self.codes.shape)}")
        n, k = self.codes.shape
        groups = 1 if self.group_size == -1 else k // self.group_size
        for label, t in (("scale", self.scale), ("zero", self.zero)):
            if t is not None and tuple(t.shape) != (n, groups):
                raise AwqNbError(f"Rounded.{label} has shape {tuple(t.shape)}, expected {(n, groups)} for codes "
                                 f"{(n, k)} and group_size={self.group_size}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def check_fits(self, name: str, shape: tuple[int, int], bits: int, group_size: int) -> "Rounded":
        """These codes, after checking that they are for a ``shape`` weight quantized as ``w{bits}g{group_size}``."""
        if self.shape != tuple(shape) or (self.bits, self.group_size) != (bits, group_size):
            raise AwqNbError(f"{name}: the codes given are w{self.bits}g{self.group_size} {self.shape} but the layer is "
                             f"{tuple(shape)} quantized as w{bits}g{group_size}; they belong to another search.")
        return self

    def int_codes(self) -> torch.Tensor:
        """The codes as int32, signed for symmetric quantization (what :func:`quantize_int` returns)."""
        q = self.codes.to(torch.int32)
        return q if self.zero is not None else q - 2 ** (self.bits - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[N, K]`` these codes stand for: ``(q - zero) * scale``, computed in fp32."""
        return dequantize_int(self.int_codes(), self.scale, self.zero, self.group_size).to(dtype)

    def to(self, device) -> "Rounded":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Rounded(self.codes.to(device), move(self.scale), move(self.zero), self.bits, self.group_size, self.method)


def from_int_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                   method: str) -> Rounded:
    """A :class:`Rounded` from int codes as :func:`awq_nb.quantizer.quantize_int` gives them."""
    offset = 0 if zero is not None else 2 ** (bits - 1)
    return Rounded((q + offset).to(torch.uint8), scale.float(), None if zero is None else zero.float(), bits,
                   group_size, method)


class Rounder(NamedTuple):
    """A rounding method: ``fn(w, scale, zero, bits, group_size, gram) -> codes int32 [N, K]``;
    ``needs_gram``: whether ``gram`` must be given (else it is None)."""

    fn: Callable[..., torch.Tensor]
    needs_gram: bool
    summary: str


ROUNDERS: dict[str, Rounder] = {}


def register(name: str, fn: Callable[..., torch.Tensor], needs_gram: bool, summary: str) -> None:
    ROUNDERS[name] = Rounder(fn, needs_gram, summary)


def get_rounder(name: str) -> Rounder:
    if name not in ROUNDERS:
        raise AwqNbError(f"rounding={name!r} is not a rounding method: choose one of {sorted(ROUNDERS)}.")
    return ROUNDERS[name]


def needs_gram(name: str) -> bool:
    return get_rounder(name).needs_gram


@torch.no_grad()
def round_weight(method: str, w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True,
                 gram: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 factors: dict | None = None) -> Rounded:
    """Round ``w [N, K]`` (scaled and clipped) with ``method`` on the grid of its own range
    (:func:`awq_nb.quantizer.quant_params`). ``gram``: ``X^T X [K, K]`` of the input ``w`` sees
    (or a :class:`awq_nb.search.RowGram`), required by methods with ``needs_gram``.

    ``target``: the weight the codes should reproduce, when it is not ``w`` itself. GPTQ after a
    clip search is given the *unclipped* weight: the grid stays the clipped one, but the error that
    clipping adds is then pushed onto later columns like any rounding error, instead of being taken
    as part of the weight (measured in docs/rounding.md).

    ``factors``: a dict the caller keeps for as long as its Gram matrices stay unchanged, handed to
    methods with ``needs_gram``; they keep there what they derive from a Gram matrix (GPTQ: its
    inverse Cholesky factor), so Linears that share one input tensor (q/k/v, gate/up) share that work."""
    rounder = get_rounder(method)
    if rounder.needs_gram:
        k = w.shape[1]
        if gram is None or tuple(gram.shape) != (k, k):
            got = None if gram is None else tuple(gram.shape)
            raise AwqNbError(f"rounding={method!r} needs the input's Gram matrix [{k}, {k}], got {got}.")
    scale, zero = quant_params(w, bits, group_size, zero_point)
    aim = w if target is None else target
    if aim.shape != w.shape:
        raise AwqNbError(f"round_weight: target {tuple(aim.shape)} and weight {tuple(w.shape)} differ in shape.")
    if rounder.needs_gram:
        q = rounder.fn(aim.float(), scale, zero, bits, group_size, gram, factors=factors)
    else:
        q = rounder.fn(aim.float(), scale, zero, bits, group_size, None)
    return from_int_codes(q, scale, zero, bits, group_size, method)


from . import gptq, rtn  # noqa: E402  (the registry entries)

register("rtn", rtn.round_weight, needs_gram=False, summary="round to nearest (AWQ as published)")
register("gptq", gptq.round_weight, needs_gram=True,
         summary="GPTQ: column-wise error feedback through the inverse Gram matrix, on the AWQ grid")


def codes_for(name: str, w: torch.Tensor, config, rounded: dict[str, Rounded] | None = None) -> Rounded:
    """The codes of Linear ``name`` (weight ``w [N, K]``, scaled and clipped) under ``config``
    (an :class:`awq_nb.AWQConfig`): those the search computed (``rounded[name]``, from
    ``AWQResult.rounded``) when given, else ``config.rounding`` applied now, which only methods
    without a Gram matrix can be."""
    if rounded and name in rounded:
        return rounded[name].check_fits(name, tuple(w.shape), config.w_bit, config.group_size)
    if needs_gram(config.rounding):
        raise AwqNbError(
            f"{name}: rounding={config.rounding!r} needs the codes the search computed (they depend on the layer's "
            "input Gram matrix) and none were given. Pass rounded=result.rounded from the same search run; a "
            "result loaded from a file keeps only scales and clips, so run the search again, or use rounding='rtn'.")
    return round_weight(config.rounding, w, config.w_bit, config.group_size, config.zero_point)
