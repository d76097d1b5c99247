"""GPTQ variants after AWQ, without redoing the AWQ search for each one (issue #17).

The scale and clip search is run once, with ``rounding="gptq"`` (so the trace keeps every
Linear's full ``X^T X``), on bench/quality.py's protocol: SmolLM2-135M bundled, 32 x 512
calibration tokens from the 1900-1989 speeches (the same ids), perplexity on 1024-token windows
of the 1990+ speeches. What each variant needs is kept in ``--workdir``:

- ``search.safetensors``: the scales and clips (:class:`awq_nb.AWQResult`);
- ``grams.pt``: each Linear's Gram matrix of its *scaled* input, over all calibration tokens,
  from the fp block inputs, as the engine handed it to the rounding step;
- ``codes.pt``: the codes the engine's GPTQ produced when the cache was made; the variant with
  that engine's settings must reproduce them (0.00 % differing): ``act+shrink0.3+cd5`` for today's
  defaults (act-order, shrinkage 0.3, dampening 0.01, 5 sweeps of coordinate descent; since
  2026-12-07), ``act+shrink0.3`` for those of 2026-12-07 before that, ``act+damp0.1`` for those
  of 2026-12-01 to 12-06, ``baseline`` for the first (natural order, dampening 0.01).

``--propagate quantized`` runs that one search with the engine's own quantized propagation
(``AWQConfig(propagate="quantized")``: scales and clips searched on the quantized model's inputs);
use another ``--workdir`` for it.

Each variant then only rounds (and, for the propagation variants, runs the blocks forward again):

- ``fp`` propagation: every Linear rounded with the cached Gram (as the engine does);
- ``quantized`` propagation: block ``i``'s Grams from inputs computed through blocks ``0..i-1``
  already replaced by their codes (the scales and clips stay those of the fp search);
- ``within``: as ``quantized``, and inside a block each input's Gram is taken after the Linears
  before it are rounded (o_proj after q/k/v, gate/up after o_proj, down_proj after gate/up).

    python bench/gptq_variants.py --workdir /tmp/gv --search-only          # the search, once (~9 min)
    python bench/gptq_variants.py --workdir /tmp/gv --windows 16 \
        --variants baseline,act,qprop,act+qprop,damp0.1,damp0.05,within,act+within,rtn     # screen
    python bench/gptq_variants.py --workdir /tmp/gv --windows 64 --variants baseline,act,act+qprop,rtn

A variant is ``+``-joined options:

- ``act``: act-order with static groups;
- ``dampX``: dampening ``X * mean(diag H)``;
- ``shrinkX``: the Gram's diagonal raised by ``X`` times itself before the dampening;
- ``firstN``: Grams over positions ``N..`` of each sequence (``first1``: without position 0);
- ``cv``: each Linear's shrink chosen among :data:`CV_SHRINKS` by 2-fold cross-validation over the
  calibration sequences (GPTQ fitted on one half's Gram, its output error measured on the other's,
  both ways), no evaluation text involved; the codes then come from the full Gram with that shrink;
- ``noclip``: the grid of the scaled weight's own range, the clip search's choice ignored;
- ``clipkeepX``: each clip ratio ``r`` pulled to ``1 - X * (1 - r)`` (``clipkeep0.5`` is ``(1 + r) / 2``);
- ``qprop`` / ``within``: propagation (above);
- ``dyn``: each group's grid fixed when the pass reaches its first column, from the weights as
  updated by then, the clip ratios applied to that range;
- ``refitX``: after the column pass, each row's group scales refitted to the codes by least squares
  on the output error, zeros kept, dampening ``X`` (default the variant's);
- ``iterN``: ``N`` column passes, each on the previous refit's grid;
- ``cdN``: after the column pass, ``N`` sweeps of coordinate descent on the same objective (each
  column set to the grid point nearest its optimum with the others fixed, as QuantEase does);
- ``asymX``: GPTQ aims at ``W (C + lambda I) (H~ + lambda I)^-1``, the weight that best reproduces
  the fp model's output from the quantized model's inputs (``C = X^T X~``, ``lambda = X *
  mean(diag H~)``). Implies ``qprop``; use it with ``within``, so that each target is fitted after
  the Linears before it are rounded (with ``qprop``, o_proj and down_proj correct again what
  q/k/v and gate/up already corrected: docs/rounding.md);
- ``NAME.option``: ``option`` only for the Linears whose name contains ``NAME`` (``down.damp0.03``).

``baseline`` is the engine's GPTQ before act-order (natural order, dampening 0.01), ``rtn`` AWQ
rounded to nearest, ``fp`` the unquantized model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import awq_nb  # noqa: E402
import awq_nb.engine as engine  # noqa: E402
from awq_nb.arch import block_linears, get_blocks, get_spec, weight_nk  # noqa: E402
from awq_nb.capture import capture_inputs, first_tensor  # noqa: E402
from awq_nb.evaluate import perplexity  # noqa: E402
from awq_nb.quantizer import quant_params  # noqa: E402
from awq_nb.rounding import from_int_codes, gptq, rtn  # noqa: E402
from awq_nb.search import RowGram, apply_clip_, as_dense, candidate_scales, weight_mean  # noqa: E402
from awq_nb.settings import FULL  # noqa: E402
from awq_nb.trace import trace_block  # noqa: E402

CALIB = "sotu:1900-1989"
EVAL = "sotu:1990-"


def run_search(model, calib: torch.Tensor, config: awq_nb.AWQConfig, work: Path, alpha_shift: float = 0.0,
               clip_shrink: float = 0.0) -> None:
    """The one AWQ search; writes search.safetensors, grams.pt and codes.pt into ``work``. ``clip_shrink``:
    the clip search scores its candidates with ``H + clip_shrink diag(H)`` (a copy; GPTQ still gets ``H``)."""
    grams: dict[str, torch.Tensor] = {}
    real = engine._search_block

    def keep_grams(idx, block, spec, tr, cfg, prefix, *args, **kwargs):
        out = real(idx, block, spec, tr, cfg, prefix, *args, **kwargs)
        # the rounding step has turned every Gram into that of the scaled input, in place;
        # q/k/v (and gate/up) share one tensor, which torch.save stores once
        grams.update({f"{prefix}.{n}": g for n, g in tr.grams.items()})
        return out

    engine._search_block = keep_grams
    real_scales = engine.search_scales
    real_clip = engine.search_clip
    if clip_shrink:
        def shrunk_clip(w, sigma, *args, **kw):
            dense = isinstance(sigma, RowGram) or sigma.dim() == 2
            sigma = as_dense(sigma).float().clone() if dense else sigma.float().clone()
            sigma.diagonal(dim1=-2, dim2=-1).mul_(1.0 + clip_shrink)
            return real_clip(w, sigma, *args, **kw)
        engine.search_clip = shrunk_clip
    if alpha_shift:
        def shifted(x_mean, weights, loss_fn, bits, group_size, zero_point, n_grid, duo=False, **kw):
            """The RTN-scored search, then its alpha lowered by ``alpha_shift`` (not below 0)."""
            alphas, losses, best, s, pruned = real_scales(x_mean, weights, loss_fn, bits, group_size, zero_point,
                                                          n_grid, duo=duo, **kw)
            if best > 0:
                best = max(0.0, round(best - alpha_shift, 6))
                w_mean = weight_mean(weights, group_size) if duo else None
                s = candidate_scales(x_mean, best, w_mean).float().cpu()
            return alphas, losses, best, s, pruned
        engine.search_scales = shifted
    try:
        t0 = time.perf_counter()
        result = awq_nb.search(model, calib, config)
        seconds = time.perf_counter() - t0
    finally:
        engine._search_block = real
        engine.search_scales = real_scales
        engine.search_clip = real_clip
    result.save(work / "search.safetensors")
    torch.save(grams, work / "grams.pt")
    torch.save({n: r.codes for n, r in result.rounded.items()}, work / "codes.pt")
    (work / "search.json").write_text(json.dumps({"seconds": seconds, "config": config.to_dict(),
                                                      "gptq": {"act_order": gptq.ACT_ORDER, "damp": gptq.DAMP},
                                                      "alpha_shift": alpha_shift, "clip_shrink": clip_shrink}))
    print(f"# search: {seconds:.0f} s, {len(grams)} Gram matrices kept", flush=True)


@dataclass(frozen=True)
class Variant:
    """One way to round after the AWQ search (module docstring)."""

    name: str
    rounding: str = "gptq"      # "gptq" or "rtn"
    act_order: bool = False
    damp: float = gptq.DAMP
    propagate: str = "fp"       # "fp" | "quantized" | "within"
    clip: bool = True           # False: the grid of the scaled weight's own range (the clip search's choice ignored)
    clip_keep: float = 1.0      # the fraction of the clip search's shrink kept: ratio r -> 1 - clip_keep * (1 - r)
    refit: float | None = None  # refit each group's scale to the codes (output error, dampening X); None: off
    rounds: int = 1             # GPTQ passes, each on the grid the previous refit gave
    asym: float | None = None   # with qprop: aim at the fp model's output from the quantized model's inputs,
                                # the least-squares target dampened by asym * mean(diag H~)
    shrink: float = 0.0         # the Gram's diagonal raised by this fraction of itself before the dampening
                                # (shrinks the input correlations towards 0, as covariance estimators do)
    first: int = 0              # the Gram matrices over positions first.. of each sequence (1: no position 0)
    overrides: tuple = ()       # (NAME, option): the option for the Linears whose name contains NAME
    cv: bool = False            # each Linear's shrink chosen from CV_SHRINKS by 2-fold cross-validation on the
                                # calibration sequences (fit on one half's Gram, output error on the other's)
    dyn: bool = False           # each group's grid taken when the pass reaches its first column, from the
                                # weights as updated so far (the clip search's ratios applied to their range)
    cd: int = 0                 # passes of coordinate descent on the codes after the column pass


def parse_variant(text: str) -> Variant:
    """``fp``, ``baseline``, ``rtn``, or ``+``-joined options (module docstring). ``NAME.option`` applies
    ``option`` only to the Linears whose name contains ``NAME`` (``down.damp0.03``)."""
    if text in ("rtn", "fp"):
        return Variant(text, rounding=text)
    v = Variant(text, act_order=False, damp=0.01)  # the engine's first GPTQ (docs/rounding.md); shrink 0
    for part in ([] if text == "baseline" else text.split("+")):
        head, dot, rest = part.partition(".")
        if dot and head.isalpha() and rest[:1].isalpha():
            apply_part(v, rest, text)  # checked now, applied per Linear (:func:`for_linear`)
            v = replace(v, overrides=v.overrides + ((head, rest),))
        else:
            v = apply_part(v, part, text)
    return v


def apply_part(v: Variant, part: str, text: str) -> Variant:
    """``v`` with one option of a variant's name applied."""
    if part == "act":
        return replace(v, act_order=True)
    if part.startswith("damp"):
        return replace(v, damp=float(part[4:]))
    if part == "noclip":
        return replace(v, clip=False)
    if part.startswith("clipkeep"):
        return replace(v, clip_keep=float(part[8:]))
    if part.startswith("refit"):
        return replace(v, refit=float(part[5:] or v.damp))
    if part.startswith("asym"):
        return replace(v, asym=float(part[4:] or v.damp), propagate="within" if v.propagate == "within" else "quantized")
    if part == "cv":
        return replace(v, cv=True)
    if part.startswith("shrink"):
        return replace(v, shrink=float(part[6:]))
    if part == "dyn":
        return replace(v, dyn=True)
    if part.startswith("first"):
        return replace(v, first=int(part[5:]))
    if part.startswith("cd"):
        return replace(v, cd=int(part[2:] or 1))
    if part.startswith("iter"):
        return replace(v, rounds=int(part[4:]))
    if part in ("qprop", "within"):
        return replace(v, propagate="within" if part == "within" else v.propagate if v.asym is not None else "quantized")
    raise SystemExit(f"unknown variant part {part!r} in {text!r}: act, dampX, noclip, clipkeepX, qprop, within, "
                     "refitX, iterN, cdN, asymX, shrinkX, cv, dyn, NAME.option")


def for_linear(v: Variant, name: str) -> Variant:
    """``v`` with its ``NAME.option`` parts applied that match Linear ``name``."""
    for head, part in v.overrides:
        if head in name:
            v = apply_part(v, part, v.name)
    return v


def scaled_model(model, result: awq_nb.AWQResult):
    """A copy of ``model`` with the searched scales folded in and *no* clipping: the same function as
    ``model``, whose Linears hold the scaled, unclipped weights GPTQ aims at."""
    return awq_nb.apply_awq(copy.deepcopy(model), replace(result, clips=[]))


def kept_clip(clip, keep: float):
    """``clip``'s (max_val, min_val) with each chosen shrink ratio ``r`` pulled towards 1.0, to
    ``1 - keep * (1 - r)`` (``keep=0.5``: ``(1 + r) / 2``; ``keep=1``: the search's own choice)."""
    def pull(val, r):
        return val if val is None or keep == 1.0 else val * (1.0 - keep * (1.0 - r)) / r  # ratios are > 0.5: no division by 0
    return pull(clip.max_val, clip.ratios), pull(clip.min_val, clip.min_ratios)


def round_linear(v: Variant, w: torch.Tensor, clip, bits: int, g: int, gram, factors: dict, aim=None,
                 name: str = "", folds=None):
    """The codes of one Linear (a Rounded): ``w`` (scaled, unclipped) on the grid of its clipped
    version (``clip``: its ClipRecord or None), rounded by variant ``v`` (with its options for ``name``)."""
    v = for_linear(v, name)
    wc = w.clone()
    if clip is not None and v.clip:
        hi, lo = kept_clip(clip, v.clip_keep)
        apply_clip_(wc, hi, g, lo)
    scale, zero = quant_params(wc, bits, g, True)
    if v.cv:
        v = replace(v, shrink=cv_shrink(w if aim is None else aim, scale, zero, bits, g, folds, v))
        CV_CHOSEN[name] = v.shrink
    if v.rounding == "rtn":
        q = rtn.round_weight(wc, scale, zero, bits, g)
    elif v.dyn:
        q, scale, zero = dynamic_round(w if aim is None else aim, clip if v.clip else None, bits, g, gram, v.damp,
                                       v.act_order, factors, v.shrink)
    else:
        for r in range(v.rounds):
            q = gptq.round_weight(w if aim is None else aim, scale, zero, bits, g, gram, damp=v.damp,
                                  act_order=v.act_order, factors=factors, shrink=v.shrink, descent=v.cd)
            if v.refit is not None and zero is not None:
                scale = refit_scales(w, q, scale, zero, g, gram, v.refit)
    return from_int_codes(q, scale, zero, bits, g, v.name)


CV_SHRINKS = (0.0, 0.1, 0.3, 1.0, 3.0)
CV_CHOSEN: dict[str, float] = {}  # the last ``cv`` variant's choice, by Linear name


def cv_shrink(aim, scale, zero, bits: int, g: int, folds, v: Variant) -> float:
    """The shrink among :data:`CV_SHRINKS` whose GPTQ codes, fitted on one fold's Gram, give the least
    output error ``tr(E H E^T)`` (``E`` the dequantized codes minus ``aim``) on the other fold's, summed
    over both directions."""
    tests = [as_dense(f).float() for f in folds]
    errs = []
    for shrink in CV_SHRINKS:
        total = 0.0
        for fit, test in ((0, 1), (1, 0)):
            q = gptq.round_weight(aim, scale, zero, bits, g, folds[fit], damp=v.damp, act_order=v.act_order,
                                  shrink=shrink, descent=v.cd)
            e = from_int_codes(q, scale, zero, bits, g, "gptq").dequantize() - aim.float()
            total += float(((e @ tests[test]) * e).sum())
        errs.append(total)
    return CV_SHRINKS[min(range(len(errs)), key=errs.__getitem__)]


_FOLD_GRAMS: dict = {}


@torch.no_grad()
def fold_grams(base, calib: torch.Tensor, g: int) -> dict:
    """Each Linear's input Gram on the fp path (``base``: the scaled model) over each half of the
    calibration sequences, as ``[first half's, second half's]``; kept for the next variant."""
    if not _FOLD_GRAMS:
        spec = get_spec(base)
        inp = capture_inputs(base, spec, calib, torch.device("cpu"))
        half = inp.hidden.shape[0] // 2
        for i, block in enumerate(get_blocks(base, spec)):
            linears = block_linears(block)
            per = [block_grams(block, linears, part, inp.args[i], inp.kwargs[i], g)
                   for part in (inp.hidden[:half], inp.hidden[half:])]
            _FOLD_GRAMS.update({f"{spec.blocks}.{i}.{n}": [p[n] for p in per] for n in linears})
            forward_(block, inp.hidden, inp.args[i], inp.kwargs[i])
    return _FOLD_GRAMS


def oas_shrinkage(gram: torch.Tensor, n: int) -> float:
    """The Oracle Approximating Shrinkage intensity ``rho`` (Chen et al., 2010) for the correlation
    matrix of ``gram`` (``n`` tokens, taken as i.i.d. Gaussian), towards the identity: the estimate
    ``(1 - rho) R + rho I``, which is ``R + rho / (1 - rho) I`` up to scale, gptq.SHRINK's form."""
    d = gram.diagonal().float().clamp_min(1e-12)
    r = gram.float() / torch.sqrt(d[:, None] * d[None, :])
    p = r.shape[0]
    tr2 = float((r * r).sum())  # tr(R^2); tr(R) = p
    return min(1.0, ((1 - 2 / p) * tr2 + p * p) / ((n + 1 - 2 / p) * (tr2 - p)))


def group_grid(vals: torch.Tensor, clip, grp: int, bits: int):
    """Scale and zero ``[N]`` of one group from its current values ``vals [g, N]`` (columns as rows), the
    clip search's ratios for that group applied to their range as the search applied them to the
    original weights (``clip``: the ClipRecord, or None for no clipping)."""
    w_lo, w_hi = vals.amin(0), vals.amax(0)
    if clip is None:
        lo, hi = w_lo, w_hi
    elif clip.min_ratios is not None:
        hi, lo = w_hi * clip.ratios[:, grp], w_lo * clip.min_ratios[:, grp]
    else:
        top = torch.maximum(w_hi, -w_lo) * clip.ratios[:, grp]
        hi, lo = torch.minimum(w_hi, top), torch.maximum(w_lo, -top)
    ends = torch.stack([torch.maximum(lo, w_lo), torch.minimum(hi, w_hi)], 1)  # the clamped weights' own range
    scale, zero = quant_params(ends, bits, -1, True)  # the grid of a row holding just those two ends
    return scale[:, 0], zero[:, 0]


@torch.no_grad()
def dynamic_round(w, clip, bits, g, gram, damp, act_order, factors, shrink):
    """GPTQ's column pass (as :func:`awq_nb.rounding.gptq.round_weight`, zero point only) in which each
    group's grid is fixed when the pass reaches the group's first column, from the weights as the
    error feedback has updated them by then (columns keep their natural groups: the "gemm" format).
    Returns ``(codes [N, K], scale [N, K/g], zero [N, K/g])``."""
    n, k = w.shape
    u, perm = gptq.ordered_factor(gram, damp, act_order, factors, shrink)
    order = torch.arange(k) if perm is None else perm
    pos = torch.empty(k, dtype=torch.long).index_copy_(0, order, torch.arange(k))  # column -> place in the pass
    wt = w.float().t()[order].contiguous()
    scale = torch.empty(n, k // g)
    zero = torch.empty(n, k // g)
    s_rows = torch.empty(k, n)
    z_rows = torch.empty(k, n)
    ready = torch.zeros(k // g, dtype=torch.bool)
    q = torch.empty(k, n, dtype=torch.int32)
    hi_code = 2 ** bits - 1
    blk = gptq.BLOCK
    for i1 in range(0, k, blk):
        i2 = min(i1 + blk, k)
        ub = u[i1:i2, i1:i2]
        err = torch.zeros(i2 - i1, n)
        for j in range(i2 - i1):
            c = i1 + j
            grp = int(order[c]) // g
            if not ready[grp]:
                places = pos[grp * g:(grp + 1) * g]
                vals = wt[places].clone()
                later = places >= i2  # their updates from this block are still pending
                if later.any() and j > 0:
                    vals[later] -= u[i1:c, places[later]].t() @ err[:j]
                scale[:, grp], zero[:, grp] = group_grid(vals, clip, grp, bits)
                s_rows[places], z_rows[places] = scale[:, grp], zero[:, grp]
                ready[grp] = True
            row = wt[c]
            qc = torch.round(row / s_rows[c]).add_(z_rows[c]).clamp_(0, hi_code)
            q[c] = qc
            err[j] = (row - (qc - z_rows[c]) * s_rows[c]) / ub[j, j]
            if c + 1 < i2:
                wt[c + 1:i2].addr_(ub[j, j + 1:], err[j], alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    q = torch.empty_like(q).index_copy_(0, order, q)
    return q.t().contiguous(), scale, zero


def refit_scales(w, q, scale, zero, g, gram, damp, ridge=1e-4):
    """Each row's group scales that minimise ``(W - Q) (H + lambda I) (W - Q)^T`` with the codes and
    zeros fixed (``Q = a_g (q - z)`` per group): one small linear system per row."""
    h = as_dense(gram).float().clone()
    d = h.diagonal()
    d[d <= 0] = 1.0
    d.add_(damp * float(d.mean()))
    n, k = w.shape
    G = k // g
    D = q.float() - zero.float().repeat_interleave(g, dim=1)
    M = torch.empty(n, G, G)
    for j in range(G):
        E = D[:, j * g:(j + 1) * g] @ h[j * g:(j + 1) * g, :]
        M[:, :, j] = (D * E).view(n, G, g).sum(-1)
    r = (D * (w.float() @ h)).view(n, G, g).sum(-1)
    dm = M.diagonal(dim1=1, dim2=2)
    reg = ridge * dm + 1e-12
    a = torch.linalg.solve(M + torch.diag_embed(reg), (r + reg * scale.float()).unsqueeze(-1)).squeeze(-1)
    bad = ~torch.isfinite(a) | (a <= 0)
    return torch.where(bad, scale.float(), a)


@torch.no_grad()
def block_grams(block, linears: dict, hidden: torch.Tensor, args, kwargs, g: int) -> dict[str, torch.Tensor]:
    """Each of ``linears``' input Gram over all of ``hidden``'s tokens (Linears that read one input
    share one tensor); ``hidden`` is left as it is."""
    tr = trace_block(block, linears, {}, hidden.clone(), args, kwargs, chunk=2, record_n=0, gram_for=set(linears),
                     group_size=g, full_gram=True)
    return tr.grams


@torch.no_grad()
def asym_grams(fp_block, block, hidden_fp, hidden, args, kwargs, chunk: int = 2, first: int = 0, names=None):
    """Per Linear of ``block`` (or of ``names``): ``H~ = X~^T X~`` of its input on the quantized path
    (``hidden``) and ``C = X^T X~`` with ``X`` the same Linear's input in ``fp_block`` on the fp path
    (``hidden_fp``). Linears that read one input (q/k/v, gate/up) share one tensor of each.
    ``first``: the positions of each sequence from which the tokens count (1: without position 0)."""
    names = list(block_linears(block)) if names is None else list(names)
    grams: dict = {}
    cross: dict = {}
    seen: dict = {}
    hooks = []
    for tag, b in (("fp", fp_block), ("q", block)):
        mods = block_linears(b)
        for n in names:
            hooks.append(mods[n].register_forward_hook(lambda mod, a, out, n=n, tag=tag: seen.__setitem__((tag, n), a[0])))
    try:
        for s in range(0, hidden.shape[0], chunk):
            fp_block(hidden_fp[s:s + chunk], *args, **kwargs)
            block(hidden[s:s + chunk], *args, **kwargs)
            done: dict = {}  # the quantized path's input tensor -> the first name that read it
            for n in names:
                xin = seen[("q", n)]
                lead = done.setdefault((xin.data_ptr(), tuple(xin.shape)), n)
                if lead != n:  # the same input as ``lead``: share its sums
                    grams[n], cross[n] = grams[lead], cross[lead]
                    continue
                xq = xin[:, first:].reshape(-1, xin.shape[-1]).float()
                xf = seen[("fp", n)][:, first:].reshape(-1, xin.shape[-1]).float()
                grams[n] = xq.t() @ xq if n not in grams else grams[n].addmm_(xq.t(), xq)
                cross[n] = xf.t() @ xq if n not in cross else cross[n].addmm_(xf.t(), xq)
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
    return grams, cross


def asym_target(w, gram, cross, damp):
    """``W (C + lambda I) (H~ + lambda I)^-1``: the weight that, fed the quantized path's inputs, best
    reproduces (least squares, dampened as GPTQ is) the fp path's output ``X W^T``."""
    lam = damp * float(gram.diagonal().clamp_min(0).mean())
    eye = torch.eye(gram.shape[0])
    rhs = (w.float() @ (cross + lam * eye))  # [N, K]
    return torch.linalg.solve(gram + lam * eye, rhs.t()).t()  # H~ symmetric: (H~+lam)^-1 applied on the right


@torch.no_grad()
def forward_(block, hidden: torch.Tensor, args, kwargs, chunk: int = 2) -> None:
    for s in range(0, hidden.shape[0], chunk):
        hidden[s:s + chunk] = first_tensor(block(hidden[s:s + chunk], *args, **kwargs))


_FP_GRAMS: dict = {}


@torch.no_grad()
def fp_grams(base, calib: torch.Tensor, first: int) -> dict:
    """Each Linear's Gram matrix on the fp path (``base``: the scaled model), over the positions
    ``first..`` of each calibration sequence; kept for the next variant."""
    if first not in _FP_GRAMS:
        spec = get_spec(base)
        inp = capture_inputs(base, spec, calib, torch.device("cpu"))
        out = {}
        for i, block in enumerate(get_blocks(base, spec)):
            gr, _ = asym_grams(block, block, inp.hidden, inp.hidden, inp.args[i], inp.kwargs[i], first=first)
            out.update({f"{spec.blocks}.{i}.{n}": t for n, t in gr.items()})
            forward_(block, inp.hidden, inp.args[i], inp.kwargs[i])
        _FP_GRAMS[first] = out
    return _FP_GRAMS[first]


@torch.no_grad()
def round_block(v: Variant, block, fp_block, hidden, hidden_fp, args, kwargs, clips: dict, prefix: str, bits: int,
                g: int, codes: dict) -> None:
    """Round every Linear of ``block`` in place by variant ``v`` on the quantized path, its Grams from
    ``hidden`` (the block's input there; left as it is), one input at a time for ``within``, else all
    at once; with ``asym``, each target fitted against ``fp_block`` on ``hidden_fp``. The codes go
    into ``codes`` by Linear name (``prefix.name``)."""
    linears = block_linears(block)
    left = list(linears)
    while left:  # "within": one input at a time, each Gram taken after the Linears before it are rounded
        aims = {}
        if v.asym is not None:  # the quantized path's Grams, and the fp targets through the cross terms
            gr, cross = asym_grams(fp_block, block, hidden_fp, hidden, args, kwargs, names=left)
        else:
            gr = block_grams(block, {n: linears[n] for n in left}, hidden, args, kwargs, g)
        stage = [n for n in left if gr[n] is gr[left[0]]] if v.propagate == "within" else left
        if v.asym is not None:
            aims = {n: asym_target(weight_nk(linears[n]), gr[n], cross[n], v.asym) for n in stage}
        factors = {}
        for n in stage:
            name = f"{prefix}.{n}"
            w = weight_nk(linears[n])
            codes[name] = round_linear(v, w, clips.get(name), bits, g, gr[n], factors, aims.get(n), name=name)
            w.copy_(codes[name].dequantize())
        left = [n for n in left if n not in stage]


@torch.no_grad()
def build(v: Variant, base, result: awq_nb.AWQResult, grams: dict, calib: torch.Tensor, bits: int, g: int):
    """The fake-quantized model of variant ``v`` (``base``: :func:`scaled_model`, not modified) and
    its codes by Linear name."""
    model = copy.deepcopy(base)
    clips = {f"{get_spec(model).blocks}.{c.block}.{c.layer}": c for c in result.clips}
    codes: dict = {}
    factors: dict = {}
    if v.first and v.propagate == "fp":
        grams = fp_grams(base, calib, v.first)
    if v.cv and v.propagate != "fp":
        raise SystemExit(f"{v.name}: cv chooses the shrink on the fp path's Grams; drop qprop/within/asym")
    folds = fold_grams(base, calib, g) if v.cv else {}
    CV_CHOSEN.clear()
    if v.propagate == "fp" or v.rounding == "rtn":
        for i, block in enumerate(get_blocks(model)):
            for n, m in block_linears(block).items():
                name = f"{get_spec(model).blocks}.{i}.{n}"
                w = weight_nk(m)
                codes[name] = round_linear(v, w, clips.get(name), bits, g, grams.get(name), factors, name=name,
                                           folds=folds.get(name))
                w.copy_(codes[name].dequantize())
        if CV_CHOSEN:
            for kind in sorted({n.rsplit(".", 1)[1] for n in CV_CHOSEN}):
                picks = [x for n, x in CV_CHOSEN.items() if n.endswith("." + kind)]
                print(f"# cv: {kind:10s} shrink chosen " + " ".join(f"{c}:{picks.count(c)}" for c in CV_SHRINKS))
        return model, codes
    spec = get_spec(model)
    inp = capture_inputs(model, spec, calib, torch.device("cpu"))
    hidden = inp.hidden
    hidden_fp = hidden.clone() if v.asym is not None else None
    fp_blocks = get_blocks(base, spec)
    for i, block in enumerate(get_blocks(model, spec)):
        round_block(v, block, fp_blocks[i], hidden, hidden_fp, inp.args[i], inp.kwargs[i], clips,
                    f"{spec.blocks}.{i}", bits, g, codes)
        if v.asym is not None:
            forward_(fp_blocks[i], hidden_fp, inp.args[i], inp.kwargs[i])
        forward_(block, hidden, inp.args[i], inp.kwargs[i])  # the next block's input, through the codes
    return model, codes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=FULL.seqlen)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=FULL.eval_seqlen)
    ap.add_argument("--skip-windows", type=int, default=0,
                    help="evaluate on windows after the first N (text that no screen has chosen on: the screens use "
                         "the first 16 or 64)")
    ap.add_argument("--search-only", action="store_true")
    ap.add_argument("--propagate", default="fp", choices=["fp", "quantized"],
                    help="AWQConfig.propagate of the one search (the engine's own quantized propagation, scales and "
                         "clips searched on the quantized model's inputs)")
    ap.add_argument("--alpha-shift", type=float, default=0.0,
                    help="the one search: each scale search's RTN-chosen alpha lowered by this much (GPTQ prefers "
                         "smaller alphas: bench/rounding_choice.py)")
    ap.add_argument("--clip-shrink", type=float, default=0.0,
                    help="the one search: the clip search scores candidates with H + X diag(H) (its cross-group "
                         "sweeps fit the calibration text's correlations too)")
    ap.add_argument("--oas", action="store_true",
                    help="print, for the cached Gram matrices of blocks 0, 10, 20 and 29, the shrinkage the OAS "
                         "estimator (i.i.d. Gaussian tokens) would choose, in gptq.SHRINK's form, and stop")
    ap.add_argument("--variants", default="rtn,baseline")
    ap.add_argument("--json", default=None, help="append each row here (JSON lines)")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = awq_nb.load_model(a.model)
    calib = awq_nb.calibration_blocks(tok, CALIB, n_samples=a.n_samples, seqlen=a.seqlen, seed=FULL.seed)
    config = awq_nb.AWQConfig(w_bit=a.w_bit, group_size=a.group_size, rounding="gptq", propagate=a.propagate)
    if not (work / "grams.pt").exists():
        run_search(model, calib, config, work, a.alpha_shift, a.clip_shrink)
    if a.search_only:
        return 0
    result = awq_nb.AWQResult.load(work / "search.safetensors")
    grams = torch.load(work / "grams.pt")
    if a.oas:
        for name, gram in grams.items():
            if any(f".layers.{i}." in name for i in (0, 10, 20, 29)):
                rho = oas_shrinkage(as_dense(gram), calib.numel())
                print(f"{name:40s} inputs {gram.shape[0]:5d}  OAS rho {rho:.4f}  as SHRINK {rho / (1 - rho):.4f}")
        return 0
    engine_codes = torch.load(work / "codes.pt")
    windows = awq_nb.eval_windows(tok, EVAL, seqlen=a.eval_seqlen, max_windows=a.skip_windows + a.windows)[a.skip_windows:]
    if windows.shape[0] < a.windows:
        raise SystemExit(f"{EVAL} has {a.skip_windows + windows.shape[0]} windows of {a.eval_seqlen} tokens: "
                         f"--skip-windows {a.skip_windows} leaves {windows.shape[0]}, fewer than --windows {a.windows}.")
    print(f"# {a.model} w{a.w_bit}g{a.group_size}: calibration {tuple(calib.shape)} from {CALIB}, eval "
          f"{tuple(windows.shape)} from {EVAL} (after the first {a.skip_windows})", flush=True)
    base = scaled_model(model, result)
    del model
    for text in a.variants.split(","):
        v = parse_variant(text)
        t0 = time.perf_counter()
        if v.rounding == "fp":  # the scaled, unclipped model computes what the fp model does
            qmodel, codes = base, None
        else:
            qmodel, codes = build(v, base, result, grams, calib, a.w_bit, a.group_size)
        t_round = time.perf_counter() - t0
        total = sum(c.numel() for c in engine_codes.values())
        moved = math.nan if codes is None else sum(int((codes[n].codes != c).sum()) for n, c in engine_codes.items()) / total
        t0 = time.perf_counter()
        ppl = perplexity(qmodel, windows=windows)["perplexity"]
        t_eval = time.perf_counter() - t0
        del qmodel, codes
        row = {**asdict(v), "perplexity": ppl, "windows": int(windows.shape[0]), "round_s": t_round, "eval_s": t_eval,
               "codes_differing_from_engine": moved}
        print(f"{v.name:>24} ppl {ppl:8.3f}  ({int(windows.shape[0])} windows; rounding {t_round:5.0f} s, eval "
              f"{t_eval:4.0f} s; codes differing from the engine's GPTQ {100 * moved:5.2f}%)", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
