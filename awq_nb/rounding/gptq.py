"""GPTQ rounding on the AWQ grid (Frantar et al., 2022), written for this package.

The weight ``W [N, K]`` is rounded one input column at a time, in natural order. Rounding
column ``j`` leaves an error ``e = (w_j - q_j) / U_jj`` per output row; it is pushed onto the
columns not yet rounded as ``W[:, j+1:] -= e U[j, j+1:]``, where ``U`` is the upper Cholesky
factor of ``H^-1`` and ``H = X^T X + lambda I`` the dampened Gram matrix of the layer's input.
This minimises, column by column, the output error ``||X (W - Q)^T||^2`` that plain rounding
ignores. Updates are applied lazily: within a block of :data:`BLOCK` columns directly, to the
columns after it by one matrix product.

Choices (docs/rounding.md has the measurements behind them):

- **The grid is fixed before the pass.** Each group's scale and zero come from the AWQ-scaled
  and clipped weight (``awq_nb.quantizer.quant_params``), so the clip search keeps its meaning and
  the codes fit the AutoAWQ "gemm" format. A column pushed past its group's range is clamped.
- **Natural column order, no act-order**: every checkpoint loads wherever it does today.
- **Dampening** ``lambda = DAMP * mean(diag H)`` (``DAMP = 0.01``, GPTQ's default); if the
  Cholesky factorisation still fails it is retried with 10x more, up to 100 %.
- **fp32 throughout.** Input channels that never fire (``H_jj = 0``) get ``H_jj = 1``: their
  column rounds to nearest and pushes nothing.
"""
from __future__ import annotations

import torch

from ..errors import AwqNbError

DAMP = 0.01
BLOCK = 128


def inverse_factor(gram: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` for ``H = gram`` (fp32 ``[K, K]``)."""
    h = gram.float().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    while True:
        hd = h.clone()
        hd.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            break
        if damp >= 1.0:
            raise AwqNbError("GPTQ: the input's Gram matrix is not positive definite even with 100 % dampening "
                             "(NaN/inf activations?); use rounding='rtn' for this model.")
        damp *= 10
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def round_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                 gram: torch.Tensor, damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """Codes int32 ``[N, K]`` of ``w`` on the fixed grid ``scale``/``zero [N, K/g]`` by GPTQ's
    column pass with error feedback through ``gram = X^T X [K, K]`` (module docstring).

    Works on ``W^T`` so that each column of ``W`` is a contiguous row: the per-column steps are
    a handful of vector ops and one in-place rank-1 update (``addr_``)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wt = w.float().t().contiguous()  # [K, N]: row c is column c of W
    u = inverse_factor(gram.to(w.device), damp)
    # each column's grid (its group's scale and zero), as rows
    s_rows = scale.float().t().repeat_interleave(g, dim=0).contiguous()
    if zero is not None:
        z_rows = zero.float().t().repeat_interleave(g, dim=0).contiguous()
        lo, hi = 0, 2**bits - 1
    else:
        z_rows = torch.zeros_like(s_rows)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
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
    return q.t().contiguous()
