"""The two AWQ searches as plain functions over tensors.

**Scale search** (one scaling group: Linears sharing an input ``x``). For alpha on a grid,

    s(alpha) = mean|x| ** alpha                     (duo: mean|x| ** alpha / mean|w| ** (1 - alpha))
    s       <- s / sqrt(max(s) * min(s))
    loss    = || M(Q(W * s) / s ; x) - M(W ; x) ||^2 / numel        (fp32)

where ``M`` is the inspected module (the attention block for q/k/v, the MLP for gate/up, or the
Linear itself) and ``Q`` the group quantizer. alpha = 0 is plain round-to-nearest. When ``M``
is a single Linear, the loss is ``tr(D Sigma D^T)`` with ``D = Q(W s)/s - W`` and the Gram matrix
``Sigma = X^T X``: computed once, every candidate is then a few small matmuls.

**Clipping search** (one Linear, after scaling). For each group of ``g`` input channels of each
output row, shrink the max |w| by ``r`` on a grid from 1.0 towards ``1 - max_shrink``; the error
of the group's contribution to the output over all calibration tokens is
``d^T Sigma_gg d`` with ``d = Q(clamp(w, -r*max, r*max)) - w`` and ``Sigma_gg`` the group's
diagonal block of the Gram matrix. Keep the best ``r`` per group.

With a zero point the quantizer's grid spans ``[min w, max w]`` of the group, so its two ends can
be shrunk separately (``asym=True``): ``d = Q(clamp(w, r_lo*min, r_hi*max)) - w`` over every pair
of ratios. A group whose large weights sit on one side then keeps that side's range and clips
only the other; one shared ratio (AutoAWQ's and llm-compressor's search) cannot. The pair
``(1, 1)`` and every shared ratio ``(r, r)`` are among the candidates, so the chosen error is
never above the shared-ratio search's.

The per-group error ignores that the groups of a row add up in one output: the row's error is
``d^T Sigma d`` over the whole row, and ``Sigma``'s off-diagonal blocks (channels that move together,
as real activations do) couple the groups. Given the full Gram matrix, the search refines the
per-group choice by Gauss-Seidel sweeps over the groups: each group in turn takes whichever of
its per-group candidates gives the least whole-row error with the other groups
held fixed, ``d_g'^T Sigma_gg d_g' + 2 d_g'^T u`` with ``u = sum_{j != g} Sigma_gj d_j``. No step
can raise the error. At w3g64 on SmolLM2 this took perplexity from 38.7 to 34.6 (docs/benchmarks.md).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .errors import AwqNbError
from .quantizer import pseudo_quantize, pseudo_quantize_


def alpha_grid(n_grid: int) -> list[float]:
    """``[0, 1/n, ..., (n-1)/n]``: alpha = 0 is round-to-nearest."""
    return [i / n_grid for i in range(n_grid)]


def clip_ratio_grid(clip_grid: int, max_shrink: float) -> list[float]:
    """``[1.0, 1 - 1/n, ...]`` down to (but not past) ``1 - max_shrink``."""
    return [1.0 - i / clip_grid for i in range(int(max_shrink * clip_grid))] or [1.0]


def weight_mean(weights: list[torch.Tensor], group_size: int, chunk: int = 1024) -> torch.Tensor:
    """Mean over output rows of |w| normalised by each group's max |w|: fp32 ``[K]`` (duo scaling).

    ``chunk`` output rows at a time, so the temporaries stay small beside the weights (an MLP's
    gate and up weights of a 7B model are 0.36 GB in fp32)."""
    k = weights[0].shape[1]
    total, rows = torch.zeros(k, dtype=torch.float32, device=weights[0].device), 0
    for w in weights:
        for r in range(0, w.shape[0], chunk):
            part = w[r : r + chunk].float().abs()
            g = part.reshape(-1, group_size if group_size > 0 else k)
            g.div_(g.amax(dim=1, keepdim=True).clamp_(min=1e-12))
            total += part.sum(0)
        rows += w.shape[0]
    return total / rows


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel scales ``[K]`` for one alpha, normalised to a geometric mid-range of 1."""
    x = x_mean.float().clamp(min=1e-4)
    s = x.pow(alpha) if w_mean is None else x.pow(alpha) / w_mean.float().clamp(min=1e-4).pow(1 - alpha)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return s


def scaled_quantized(w: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """``Q(W * s) / s`` for ``w [N, K]`` in fp32: the effective weight seen by the unscaled input."""
    ws = (w.float() * s).contiguous()  # a transposed Conv1D weight gives a transposed product
    return pseudo_quantize_(ws, bits, group_size, zero_point).div_(s)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` over all leading dims of ``x [..., K]``, fp32 ``[K, K]``."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return x2.T @ x2


class RowGram:
    """A Gram matrix ``X^T X`` held as its rows ``X [T, K]`` (fp32).

    With fewer tokens than input channels (``T < K``: a small calibration budget on a wide
    model) the rows take less memory than the ``[K, K]`` matrix and are cheaper to apply:
    ``D X^T X`` is two products of ``T K N`` flops instead of one of ``K^2 N``. The searches and
    the per-layer errors take either form through the functions below (:func:`gram_loss`,
    :func:`gram_blocks`, :func:`gram_rows`, :func:`unscale_gram_`, :func:`as_dense`), and
    ``d @ g`` and ``g[rows, cols]`` work as on a matrix. The trace chooses the form
    (awq_nb/trace.py)."""

    def __init__(self, x: torch.Tensor):
        if x.dim() != 2:
            raise AwqNbError(f"RowGram takes the rows X [T, K], got shape {tuple(x.shape)}.")
        self.x = x

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.x.shape[1], self.x.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.x.device

    def dim(self) -> int:
        return 2

    def to(self, device=None, dtype=None) -> "RowGram":
        x = self.x.to(device=device, dtype=dtype)
        return self if x is self.x else RowGram(x)

    def __rmatmul__(self, d: torch.Tensor) -> torch.Tensor:  # d @ X^T X
        return (d @ self.x.T) @ self.x

    def __getitem__(self, idx) -> torch.Tensor:  # a dense block X[:, rows]^T X[:, cols]
        rows, cols = idx
        return self.x[:, rows].T @ self.x[:, cols]


def as_dense(sigma) -> torch.Tensor:
    """``sigma`` as a ``[K, K]`` tensor (a :class:`RowGram` is multiplied out; a tensor is returned as is)."""
    return sigma.x.T @ sigma.x if isinstance(sigma, RowGram) else sigma


def gram_diag_blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal ``g x g`` blocks of ``X^T X``: fp32 ``[K/g, g, g]`` (per-channel: ``[1, K, K]``)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    k = x2.shape[1]
    g = group_size if group_size > 0 else k
    xg = x2.reshape(x2.shape[0], k // g, g).transpose(0, 1)  # [G, T, g]
    return xg.transpose(1, 2) @ xg


def gram_blocks(sigma, group_size: int) -> torch.Tensor:
    """The diagonal ``g x g`` blocks of a ``[K, K]`` Gram matrix (or a :class:`RowGram`): ``[K/g, g, g]``."""
    if isinstance(sigma, RowGram):
        return gram_diag_blocks(sigma.x, group_size)
    k = sigma.shape[0]
    g = group_size if group_size > 0 else k
    n = k // g
    return sigma.reshape(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def gram_rows(d: torch.Tensor, sigma, cols: slice) -> torch.Tensor:
    """``d @ sigma[cols, :]`` for ``d [c, len(cols)]``, without forming the rows of a :class:`RowGram`."""
    if isinstance(sigma, RowGram):
        return (d @ sigma.x[:, cols].T) @ sigma.x
    return d @ sigma[cols, :]


def unscaled_gram(sigma, s: torch.Tensor):
    """The Gram matrix of ``x / s`` (the input a weight scaled by ``s`` sees) from that of ``x``:
    full ``[K, K]``, a :class:`RowGram`, or diagonal blocks ``[G, g, g]``."""
    if isinstance(sigma, RowGram):
        return RowGram(sigma.x / s)
    if sigma.dim() == 2:
        return sigma / (s[:, None] * s[None, :])
    sg = s.reshape(-1, sigma.shape[-1])
    return sigma / (sg[:, :, None] * sg[:, None, :])


def unscale_gram_(sigma, s: torch.Tensor):
    """:func:`unscaled_gram` in place (no second ``[K, K]`` matrix); returns ``sigma``."""
    if isinstance(sigma, RowGram):
        sigma.x.div_(s)
        return sigma
    if sigma.dim() == 2:
        return sigma.div_(s[:, None]).div_(s[None, :])
    sg = s.reshape(-1, sigma.shape[-1])
    return sigma.div_(sg[:, :, None]).div_(sg[:, None, :])


LOSS_ROWS = 1024  # output rows per product in gram_loss: bounds its temporary to LOSS_ROWS x max(K, T)


def gram_loss(d: torch.Tensor, sigma) -> float:
    """``tr(D Sigma D^T)`` for ``d [N, K]``: the summed squared output error of ``x @ d^T``.

    ``sigma``: ``[K, K]`` or a :class:`RowGram` (then ``||D X^T||^2``). Summed over chunks of
    :data:`LOSS_ROWS` rows, so a large weight needs no second weight-sized temporary."""
    total = 0.0
    for r in range(0, d.shape[0], LOSS_ROWS):
        dc = d[r : r + LOSS_ROWS]
        if isinstance(sigma, RowGram):
            total += float((dc @ sigma.x.T).square_().sum())
        else:
            total += float(((dc @ sigma) * dc).sum())
    return total


def search_scales(
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    loss_fn: Callable[..., tuple[float, bool]],
    bits: int,
    group_size: int,
    zero_point: bool,
    n_grid: int,
    duo: bool = False,
    prune: bool = False,
    first_alpha: float = 0.5,
):
    """Grid search of alpha for one scaling group.

    ``weights``: the group's Linear weights ``[N_i, K]``; ``loss_fn(effective_weights, bound)``
    returns ``(loss, complete)``: the output error of the inspected module given each Linear's
    effective weight ``Q(W s)/s``, and whether it summed every term. A candidate whose loss is not
    finite is recorded as ``inf`` and never chosen; ties go to the smaller alpha.

    ``prune`` (exact branch and bound): each candidate is given the best loss so far as ``bound``,
    and ``loss_fn`` may stop summing its non-negative per-sequence errors once the partial sum
    exceeds it (``complete=False``). Such a candidate cannot be the best, so the chosen alpha and
    scales are those of the full grid. alpha = 0 (plain rounding) is always measured in full; the
    rest go from ``first_alpha`` outwards (the previous block's best makes a tight bound early).
    Returns ``(alphas, losses, best_alpha, best_scales, pruned)``; ``pruned[i]`` marks a loss that
    is only a lower bound.
    """
    w_mean = weight_mean(weights, group_size) if duo else None
    alphas = alpha_grid(n_grid)
    losses = [math.inf] * len(alphas)
    pruned = [False] * len(alphas)
    best_i, best_s = None, torch.ones_like(x_mean, dtype=torch.float32)
    order = sorted(range(len(alphas)), key=lambda i: (alphas[i] != 0.0, abs(alphas[i] - first_alpha), alphas[i]))
    for i in order:
        s = candidate_scales(x_mean, alphas[i], w_mean).to(weights[0].device)
        eff = [scaled_quantized(w, s, bits, group_size, zero_point) for w in weights]
        best = losses[best_i] if best_i is not None else math.inf
        loss, complete = loss_fn(eff, best if prune and alphas[i] != 0.0 else math.inf)
        loss = loss if math.isfinite(loss) else math.inf  # NaN/inf in a candidate propagates into its loss
        losses[i], pruned[i] = loss, not complete
        if complete and (loss < best or (loss == best and best_i is not None and i < best_i)):
            best_i, best_s = i, s
    best_alpha = alphas[best_i] if best_i is not None else 0.0
    return alphas, losses, best_alpha, best_s.float().cpu(), pruned


class ClipFound(NamedTuple):
    """What :func:`search_clip` chose for one Linear (fp32, CPU, ``[N, K/g]`` each).

    Weights of a group are clamped to ``[min_val, max_val]``; ``min_val`` is None for a shared
    ratio (then the range is ``[-max_val, max_val]``). ``ratios`` (and ``min_ratios``) are the
    chosen shrink factors; the losses are summed squared output errors over all calibration
    tokens without and with the clipping."""

    max_val: torch.Tensor
    ratios: torch.Tensor
    loss_before: float
    loss_after: float
    min_val: torch.Tensor | None = None
    min_ratios: torch.Tensor | None = None


def search_clip(
    w: torch.Tensor,
    sigma: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    ratios: list[float],
    chunk: int,
    asym: bool = False,
    sweeps: int = 2,
) -> ClipFound:
    """Clipping search for one Linear ``w [N, K]`` (already scaled), ``chunk`` output rows at a time.

    ``sigma``: the input's Gram matrix, either its diagonal blocks ``[G, g, g]`` (each group scored
    on its own) or the full ``[K, K]`` (``X^T X``). With the full matrix, the per-group choice is
    refined by up to ``sweeps`` passes over the groups on the whole output error, cross-group
    terms included (module docstring).
    ``asym`` (zero point only): shrink each group's min and max by separate ratios, all
    ``len(ratios)**2`` pairs; otherwise clamp to ``[-r * max|w|, r * max|w|]``.
    """
    n, k = w.shape
    g = group_size if group_size > 0 else k
    n_groups = k // g
    if not ratios or ratios[0] != 1.0:
        raise AwqNbError(f"clip ratios must start at 1.0 (no clipping), got {ratios[:3]}...: use clip_ratio_grid().")
    asym = asym and zero_point
    sigma = sigma.to(w.device, torch.float32)
    full = sigma if sigma.dim() == 2 and sweeps > 0 and n_groups > 1 else None
    blocks = gram_blocks(sigma, g) if sigma.dim() == 2 else sigma
    lo_r = torch.tensor([lo for hi in ratios for lo in ratios] if asym else ratios, device=w.device)
    hi_r = torch.tensor([hi for hi in ratios for lo in ratios] if asym else ratios, device=w.device)
    if full is not None:  # every candidate's error is kept for the sweeps: bound that to ~64 MB
        chunk = max(1, min(chunk, CROSS_BYTES // (4 * len(lo_r) * k)))
    out = {"max_val": [], "ratios": [], **({"min_val": [], "min_ratios": []} if asym else {})}
    before = after = 0.0
    for r0 in range(0, n, chunk):
        wg = w[r0 : r0 + chunk].float().reshape(-1, n_groups, g).transpose(0, 1).contiguous()  # [G, c, g]
        w_lo, w_hi = torch.aminmax(wg, dim=-1, keepdim=True)  # [G, c, 1]
        if asym:
            top, bottom = w_hi, w_lo
        else:
            top = torch.maximum(w_hi, -w_lo)
            bottom = -top
        errs = []  # per candidate: [G, c]
        deltas = torch.empty(len(lo_r), *wg.shape, device=w.device) if full is not None else None
        for p, (r_lo, r_hi) in enumerate(zip(lo_r.tolist(), hi_r.tolist())):
            lo, hi = bottom * r_lo, top * r_hi
            clamped = torch.minimum(torch.maximum(wg, lo), hi)
            # clamping is monotone, so a group's new min and max are its old ones clamped alike
            ends = (torch.minimum(torch.maximum(w_lo, lo), hi), torch.minimum(torch.maximum(w_hi, lo), hi))
            wq = pseudo_quantize(clamped.reshape(-1, g), bits, g, zero_point, extremes=ends).reshape(wg.shape)
            dt = wq.sub_(wg) if deltas is None else torch.sub(wq, wg, out=deltas[p])
            err = (torch.bmm(dt, blocks) * dt).sum(-1)  # one small matmul per group
            errs.append(err)
        errs = torch.stack(errs).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)  # [P, G, c]; never pick NaN/inf
        best = errs.argmin(0)  # [G, c]
        if deltas is None:
            before += float(errs[0].sum())  # candidate 0 is the pair (1, 1): no clipping
            after += float(errs.gather(0, best[None]).sum())
        else:
            b, a = _refine_cross(deltas, errs, best, full, sweeps)
            before += b
            after += a
        out["max_val"].append((top.squeeze(-1) * hi_r[best]).T.cpu())
        out["ratios"].append(hi_r[best].T.cpu())
        if asym:
            out["min_val"].append((bottom.squeeze(-1) * lo_r[best]).T.cpu())
            out["min_ratios"].append(lo_r[best].T.cpu())
    cat = {key: torch.cat(v) for key, v in out.items()}
    if not asym:
        return ClipFound(cat["max_val"], cat["ratios"], before, after)
    return ClipFound(cat["max_val"], cat["ratios"], before, after, cat["min_val"], cat["min_ratios"])


CROSS_BYTES = 64 << 20  # candidate errors kept per row chunk by the cross-group sweeps


def _refine_cross(deltas: torch.Tensor, errs: torch.Tensor, best: torch.Tensor, sigma: torch.Tensor, sweeps: int):
    """Gauss-Seidel over groups on the whole output error ``sum_n d_n^T Sigma d_n`` of a chunk of
    rows. ``deltas [P, G, c, g]``: each candidate's weight error; ``errs [P, G, c]``: its per-group
    error ``d_g^T Sigma_gg d_g``; ``best [G, c]``: the per-group choice, updated in place. Each step
    lowers the error or keeps it. Returns (error without clipping, error after)."""
    _, n_groups, c, g = deltas.shape
    rows = torch.arange(c, device=deltas.device)

    def row_major(t):  # [G, c, g] -> [c, K]
        return t.transpose(0, 1).reshape(c, -1)

    d0 = row_major(deltas[0])  # candidate 0: no clipping
    e0 = ((d0 @ sigma) * d0).sum(-1)
    d = deltas[best, torch.arange(n_groups, device=deltas.device)[:, None], rows[None, :]]  # [G, c, g]
    v = (row_major(d) @ sigma).reshape(c, n_groups, g).transpose(0, 1)  # Sigma d per row, as [G, c, g]
    before = float(e0.sum())
    for _ in range(sweeps):
        changed = False
        for gi in range(n_groups):
            cols = slice(gi * g, (gi + 1) * g)
            dg = d[gi]
            u = v[gi] - dg @ sigma[cols, cols]  # the other groups' pull: sum_j Sigma_gj d_j, j != g
            # the whole error with this group alone moved to each candidate, up to a constant
            j = errs[:, gi] + 2 * (deltas[:, gi] * u).sum(-1)  # [P, c]
            pick = j.argmin(0)
            cur = best[gi]
            better = j[pick, rows] < j[cur, rows]
            if not bool(better.any()):
                continue
            changed = True
            pick = torch.where(better, pick, cur)
            new = deltas[pick, gi, rows]
            v += gram_rows(new - dg, sigma, cols).reshape(c, n_groups, g).transpose(0, 1)
            d[gi] = new
            best[gi] = pick
        if not changed:
            break
    e = (row_major(v) * row_major(d)).sum(-1)
    worse = e > e0  # a row that ends worse as a whole than without clipping is not clipped
    best[:, worse] = 0
    return before, float(torch.where(worse, e0, e).sum())


def apply_clip_(w: torch.Tensor, max_val: torch.Tensor, group_size: int, min_val: torch.Tensor | None = None) -> None:
    """Clamp ``w [N, K]`` in place per group to ``[min_val, max_val]`` (``[N, K/g]`` each), or to
    ``[-max_val, max_val]`` when ``min_val`` is None."""
    n, k = w.shape
    g = group_size if group_size > 0 else k
    hi = max_val.to(w.device, torch.float32).unsqueeze(-1)
    lo = -hi if min_val is None else min_val.to(w.device, torch.float32).unsqueeze(-1)
    if w.dtype == torch.float32 and w.is_contiguous():  # in place: no weight-sized temporary
        wv = w.view(n, k // g, g)
        torch.maximum(wv, lo, out=wv)
        torch.minimum(wv, hi, out=wv)
        return
    clamped = torch.minimum(torch.maximum(w.float().reshape(n, k // g, g), lo), hi)
    w.copy_(clamped.reshape(n, k).to(w.dtype))
