"""Salient input channels, and the AWQ paper's mixed-precision experiment (Lin et al., 2024, Table 1).

For a Linear ``y = W x`` with ``K`` input channels, keep a set ``S`` of ``ceil(fraction * K)``
input channels exactly and round the other weight columns with RTN (the grid of each group is
computed over the whole group, kept columns included, as usual)::

    W_hat[:, k] = W[:, k]       if k in S
                  Q(W)[:, k]    otherwise

The rules that choose ``S`` (:data:`RULES`):

* ``"activation"``: the channels with the largest mean ``|x_k|`` over calibration tokens;
* ``"weight"``: the channels with the largest column norm ``||W[:, k]||_2``;
* ``"random"``: a seeded random draw of the same size;
* ``"none"``: no channel (plain RTN).

Notebook 02 runs each rule over every decoder Linear with :func:`awq_nb.nb.edited_weights` and
:func:`rtn_keeping_edit`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import AwqNbError
from .quantizer import pseudo_quantize
from .results import ChannelStats

RULES = ("activation", "weight", "random", "none")
SALIENT_FRACTION = 0.01  # AWQ paper: protecting ~1% of channels recovers most of the loss


def n_salient(k: int, fraction: float) -> int:
    """How many of ``k`` channels a ``fraction`` keeps: ``ceil(fraction * k)``, at least 1."""
    return max(1, math.ceil(fraction * k))


def top_channels(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest entries of ``values [K]``, largest first (ties: lower index first)."""
    return torch.argsort(values.detach().cpu(), descending=True, stable=True)[:n]


def choose_channels(rule: str, w: torch.Tensor, mean_abs: torch.Tensor | None = None, fraction: float = SALIENT_FRACTION,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The input channels ``rule`` keeps for weight ``w [N, K]`` (module docstring), a LongTensor on
    the CPU. ``mean_abs [K]``: mean ``|x|`` per input channel (``"activation"`` only);
    ``generator``: the random draw's (``"random"`` only)."""
    k = w.shape[1]
    n = n_salient(k, fraction)
    if rule == "activation":
        if mean_abs is None or mean_abs.shape != (k,):
            raise AwqNbError(f"rule 'activation' needs mean_abs of shape ({k},), got "
                             f"{None if mean_abs is None else tuple(mean_abs.shape)}: pass the Linear's ChannelStats.mean_abs.")
        return top_channels(mean_abs, n)
    if rule == "weight":
        return top_channels(w.detach().float().norm(dim=0), n)
    if rule == "random":
        return torch.randperm(k, generator=generator)[:n]
    if rule == "none":
        return torch.empty(0, dtype=torch.long)
    raise AwqNbError(f"unknown saliency rule {rule!r}: choose one of {RULES}.")


def rtn_keeping(w: torch.Tensor, channels: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """RTN of ``w [N, K]`` with the input columns ``channels`` put back in floating point; same shape and dtype."""
    q = pseudo_quantize(w, bits, group_size, zero_point)
    idx = channels.to(w.device)
    q[:, idx] = w[:, idx]
    return q


def rtn_keeping_edit(rule: str, stats: dict[str, ChannelStats] | None, bits: int, group_size: int,
                     fraction: float = SALIENT_FRACTION, seed: int = 0) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """An ``edit(name, w)`` for :func:`awq_nb.nb.edited_weights`: :func:`rtn_keeping` with the
    channels ``rule`` chooses. ``stats``: activation statistics by Linear name (rule
    ``"activation"``); the random rule draws from one generator seeded with ``seed``, Linear after
    Linear, so the same calls give the same channels."""
    if rule not in RULES:
        raise AwqNbError(f"unknown saliency rule {rule!r}: choose one of {RULES}.")
    if rule == "activation" and stats is None:
        raise AwqNbError("rule 'activation' needs activation statistics: pass stats=awq_nb.nb.activation_stats(...).")
    generator = torch.Generator().manual_seed(seed)

    def edit(name: str, w: torch.Tensor) -> torch.Tensor:
        mean_abs = stats[name].mean_abs if rule == "activation" else None
        return rtn_keeping(w, choose_channels(rule, w, mean_abs, fraction, generator), bits, group_size)

    return edit


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of the channels in ``a`` that are also in ``b`` (0 to 1)."""
    if a.numel() == 0:
        raise AwqNbError("overlap of an empty channel set is undefined: choose at least one channel.")
    return len(set(a.tolist()) & set(b.tolist())) / a.numel()


def rule_overlap(w: torch.Tensor, mean_abs: torch.Tensor, fraction: float = SALIENT_FRACTION, a: str = "activation",
                 b: str = "weight") -> float:
    """The share of the channels rule ``a`` keeps for ``w [N, K]`` that rule ``b`` keeps too."""
    return overlap(choose_channels(a, w, mean_abs, fraction), choose_channels(b, w, mean_abs, fraction))
