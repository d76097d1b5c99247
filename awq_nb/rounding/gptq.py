"""GPTQ rounding on the AWQ grid (Frantar et al., 2022), written for this package.

The weight ``W [N, K]`` is rounded one input column at a time. Rounding column ``j`` leaves an
error ``e = (w_j - q_j) / U_jj`` per output row; it is pushed onto the columns not yet rounded as
``W[:, later] -= e U[j, later]``, where ``U`` is the upper Cholesky factor of ``H^-1`` and
``H = X^T X + shrink diag(X^T X) + lambda I`` the shrunk and dampened Gram matrix of the layer's
input (below), both taken in the order the columns are visited. This minimises, column by column, the output error
``||X (W - Q)^T||^2`` that plain rounding ignores. Updates are applied lazily: within a block of
:data:`BLOCK` columns directly, to the columns after it by one matrix product.

Choices (docs/rounding.md has the measurements behind them):

- **The grid is fixed before the pass.** Each group's scale and zero come from the AWQ-scaled
  and clipped weight (``awq_nb.quantizer.quant_params``), so the clip search keeps its meaning and
  the codes fit the AutoAWQ "gemm" format. A column pushed past its group's range is clamped.
- **Act-order with static groups** (``act_order``, default :data:`ACT_ORDER`): the columns are
  visited in descending order of ``H_jj`` (the inputs with the most energy first, while most
  columns are still free to absorb their error), but each column keeps its own group's scale and
  zero and its code is stored in its own place. The checkpoint is the same AutoAWQ "gemm" format,
  with no permutation index (``g_idx``) to ship. ``act_order=False``: natural order.
- **Shrinkage, then dampening**: ``H`` is replaced by ``H + shrink * diag(H) + lambda I`` with
  ``lambda = damp * mean(diag H')`` (``H'`` the shrunk matrix). ``shrink`` (default :data:`SHRINK` =
  0.3) pulls the input correlations towards zero, as covariance estimators do: the correlations
  measured on the calibration text carry over only in part to other text, and GPTQ's error
  feedback, which relies on them, otherwise fits the calibration text at the expense of new text.
  (The shrinkage an i.i.d. sampling model would call for, 0.0005-0.04 by the OAS estimate on
  SmolLM2, is far smaller: tokens within a sequence are not independent, and the text shifts.) ``damp``
  (default :data:`DAMP` = 0.01, GPTQ's own) is the small ridge that keeps the factorisation
  stable; if it still fails it is retried with 10x more, up to 100 %. Both were chosen on
  perplexity and checked on text no choice was made on (docs/rounding.md, "Shrinking the Gram
  matrix").
- **Coordinate descent after the pass** (``descent``, default :data:`DESCENT` = 5 sweeps): GPTQ's
  pass is greedy, and a column once rounded is never revisited, though the columns rounded after it
  change what it should have been. Each sweep sets every column in turn, in all rows at once, to the
  grid point nearest its optimum with the others held (:func:`descend`, as QuantEase, Behdin et al.,
  2023), on the same shrunk objective: no step raises it. Measured on perplexity, and on text no
  choice was made on (docs/rounding.md, "Coordinate descent after the column pass"); each sweep costs
  about one column pass.
- **fp32 throughout.** Input channels that never fire (``H_jj = 0``) get ``H_jj = 1``: their
  column rounds to nearest and pushes nothing.
- **One factorisation per Gram matrix**: Linears that read the same input (q/k/v, gate/up) share
  one Gram tensor; a ``factors`` dict kept by the caller holds its factor, so it is computed once.
"""
from __future__ import annotations

import torch

from ..errors import AwqNbError
from ..search import RowGram, as_dense

DAMP = 0.01  # GPTQ's own ridge; with SHRINK, measured in docs/rounding.md, "Shrinking the Gram matrix"
SHRINK = 0.3  # the Gram's diagonal raised by 30 % of itself (ditto)
BLOCK = 128
ACT_ORDER = True  # measured better after AWQ: docs/rounding.md, "Variants"
DESCENT = 5  # sweeps of coordinate descent after the column pass: docs/rounding.md, "Coordinate descent"


def conditioned(gram: torch.Tensor, damp: float = DAMP, shrink: float = SHRINK) -> torch.Tensor:
    """``H + shrink diag(H) + lambda I`` for ``H = gram`` (fp32 ``[K, K]``, a new tensor), ``lambda = damp *
    mean`` of the shrunk diagonal; inputs that never fire (``H_jj = 0``) get ``H_jj = 1`` first."""
    h = gram.float().clone()
    diag = h.diagonal()
    diag.mul_(1.0 + shrink)
    diag[diag <= 0] = 1.0
    diag.add_(damp * float(diag.mean()))
    return h


def inverse_factor(gram: torch.Tensor, damp: float = DAMP, shrink: float = SHRINK) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of :func:`conditioned` ``(gram)^-1`` (fp32 ``[K, K]``; module
    docstring), the dampening raised 10x at a time (to 100 %) while the factorisation fails."""
    while True:
        lower, info = torch.linalg.cholesky_ex(conditioned(gram, damp, shrink))
        if int(info) == 0:
            break
        if damp >= 1.0:
            raise AwqNbError("GPTQ: the input's Gram matrix is not positive definite even with 100 % dampening "
                             "(NaN/inf activations?); use rounding='rtn' for this model.")
        damp *= 10
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def column_order(gram: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """The order the columns are visited in: descending ``diag(gram)`` (ties in natural order) with
    ``act_order``, else None (natural order)."""
    if not act_order:
        return None
    return torch.sort(gram.diagonal(), descending=True, stable=True).indices


def in_order(dense: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The Gram matrix ``dense [K, K]`` with its rows and columns in the order ``perm`` (None: as it is)."""
    if perm is None:
        return dense
    perm = perm.to(dense.device)
    return dense[perm][:, perm]


def ordered_factor(gram: torch.Tensor | RowGram, damp: float, act_order: bool,
                   factors: dict | None = None, shrink: float = SHRINK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(U, perm)``: the column order (:func:`column_order`) and :func:`inverse_factor` of the
    Gram matrix taken in that order. ``factors``: a dict the caller keeps while its Gram matrices
    stay as they are; a Gram tensor already factorised (the same tensor, with the same
    ``_version``, damp, shrink and order) is not factorised again."""
    key = (id(gram), (gram.x if isinstance(gram, RowGram) else gram)._version, damp, shrink, act_order)
    if factors is not None and key in factors:
        return factors[key][1:]
    dense = as_dense(gram)  # a RowGram (the trace's form for a small budget) is multiplied out here, once
    perm = column_order(dense, act_order)
    u = inverse_factor(in_order(dense, perm), damp, shrink)
    del dense
    if factors is not None:
        factors[key] = (gram, u, perm)  # holding ``gram`` keeps its id from being reused
    return u, perm


@torch.no_grad()
def round_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                 gram: torch.Tensor, damp: float = DAMP, block: int = BLOCK, act_order: bool = ACT_ORDER,
                 factors: dict | None = None, shrink: float = SHRINK, descent: int = DESCENT) -> torch.Tensor:
    """Codes int32 ``[N, K]`` of ``w`` on the fixed grid ``scale``/``zero [N, K/g]`` by GPTQ's
    column pass with error feedback through ``gram = X^T X [K, K]`` (module docstring), the
    columns visited in act-order with ``act_order``, then ``descent`` sweeps of coordinate descent
    (:func:`descend`). ``factors``: see :func:`ordered_factor`.

    Works on ``W^T`` so that each column of ``W`` is a contiguous row: the per-column steps are
    a handful of vector ops and one in-place rank-1 update (``addr_``)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    u, perm = ordered_factor(gram, damp, act_order, factors, shrink)
    u = u.to(w.device)
    # each column's grid (its group's scale and zero), as rows
    s_rows = scale.float().t().repeat_interleave(g, dim=0)
    if zero is not None:
        z_rows = zero.float().t().repeat_interleave(g, dim=0)
        lo, hi = 0, 2**bits - 1
    else:
        z_rows = torch.zeros_like(s_rows)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wt = w.float().t()  # [K, N]: row c is column c of W
    if perm is not None:  # visit the columns in act-order; each keeps its own group's grid
        perm = perm.to(w.device)
        wt, s_rows, z_rows = wt[perm], s_rows[perm], z_rows[perm]
    wt, s_rows, z_rows = wt.contiguous(), s_rows.contiguous(), z_rows.contiguous()
    aim = wt.clone() if descent else None  # the pass below overwrites ``wt``
    if wt.data_ptr() == w.data_ptr():
        wt = wt.clone()
    q = torch.empty(k, n, dtype=torch.int32, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        ub = u[i1:i2, i1:i2]
        err = torch.empty(i2 - i1, n, device=w.device)
        for j in range(i2 - i1):
            c = i1 + j
            row = wt[c]
            qc = torch.round(row / s_rows[c]).add_(z_rows[c]).clamp_(lo, hi)
            q[c] = qc
            e = torch.sub(row, qc.sub_(z_rows[c]).mul_(s_rows[c]), out=err[j]).div_(ub[j, j])
            if c + 1 < i2:
                wt[c + 1:i2].addr_(ub[j, j + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    del wt
    if descent:  # the conditioned matrix is rebuilt, not kept in ``factors``: one K x K less held per Gram
        h = conditioned(in_order(as_dense(gram), perm).to(w.device), damp, shrink)
        q = descend(aim, q, s_rows, z_rows, lo, hi, h, descent, block)
    if perm is not None:  # back to the columns' own places
        q = torch.empty_like(q).index_copy_(0, perm, q)
    return q.t().contiguous()


@torch.no_grad()
def descend(aim: torch.Tensor, q: torch.Tensor, s_rows: torch.Tensor, z_rows: torch.Tensor, lo: int, hi: int,
            h: torch.Tensor, sweeps: int, block: int = BLOCK) -> torch.Tensor:
    """Codes ``q`` int32 ``[K, N]`` (column ``c`` of ``W`` as row ``c``) after ``sweeps`` sweeps of
    coordinate descent on GPTQ's objective ``tr(E H E^T)``, ``E = W - Q``, ``H = h`` (the conditioned
    Gram matrix, in the same column order as the rows), on the fixed grid ``s_rows``/``z_rows``.

    Each column in turn is set, in every row at once, to the grid point nearest its optimum with all
    the other columns held: ``Q_c + (E H)_c / H_cc``. No step raises the objective, so each sweep
    lowers it or leaves it. (GPTQ's pass is greedy: a column, once rounded, is not revisited though
    later columns' errors change what it should be.) ``E H`` is kept up to date, within a block of
    ``block`` columns at each step, for the other columns once per block by one matrix product."""
    k, n = aim.shape
    qf = q.float()
    grad = h @ (aim - (qf - z_rows) * s_rows)  # (E H)^T, E = W - Q
    # a gradient row over H_cc, divided by the scale, is the step in codes: 1 / (H_cc s)
    step = s_rows.reciprocal().mul_(h.diagonal().reciprocal().unsqueeze(1))
    rows_q, rows_g, rows_step, rows_s = qf.unbind(0), grad.unbind(0), step.unbind(0), s_rows.unbind(0)
    changes = torch.empty(min(block, k), n, device=aim.device)  # each column's change in Q, per block
    for _ in range(sweeps):
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            delta = changes[:i2 - i1]
            rows_d, grad_block = delta.unbind(0), grad[i1:i2]
            for j in range(i2 - i1):
                c = i1 + j
                # the code nearest the column's optimum Q_c + (E H)_c / H_cc (zeros are integers)
                qn = torch.addcmul(rows_q[c], rows_g[c], rows_step[c]).round_().clamp_(lo, hi)
                d = torch.sub(qn, rows_q[c], out=rows_d[j])
                rows_q[c].copy_(qn)
                grad_block.addr_(h[i1:i2, c], d.mul_(rows_s[c]), alpha=-1)
            if i1 > 0:
                grad[:i1].addmm_(h[:i1, i1:i2], delta, alpha=-1)
            if i2 < k:
                grad[i2:].addmm_(h[i2:, i1:i2], delta, alpha=-1)
    return qf.to(torch.int32)
