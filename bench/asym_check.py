"""Is GPTQ's asymmetric target sound at the layer level? (issue #17, docs/rounding.md)

On SmolLM2 (bundled), with bench/gptq_variants.py's search cache (``--workdir``, default /tmp/gv):
blocks 0-3 are rounded to nearest on their own grid, standing in for the quantized path; for
block 4's Linears, each weight is rounded by GPTQ aiming at ``W`` and at the asymmetric target
``W* = W (C + l I) (H~ + l I)^-1`` (``C = X^T X~``: fp inputs against quantized-path inputs) fitted on
16 calibration sequences, and the error ``||X W^T - X~ Q^T||^2`` is measured on 8 *other* sequences.

    python bench/gptq_variants.py --workdir /tmp/gv --search-only    # once
    python bench/asym_check.py --workdir /tmp/gv

``--track VARIANTS`` follows whole quantized paths instead: for each of bench/gptq_variants.py's
variants (comma-separated, e.g. ``act+damp0.1+qprop,act+damp0.1+within+asym1``) the blocks are
rounded one after another as ``gptq_variants.build`` does, with every Gram and target fitted on
the first 16 of 24 calibration sequences, and after each block the relative error of the hidden
state against the fp path is printed, on the 8 held-out sequences and on the 16 fitted ones
(position 0 left out of both).

    python bench/asym_check.py --workdir /tmp/gv --track act+damp0.1+qprop,act+damp0.1+asym1 --blocks 12
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gptq_variants as gv  # noqa: E402

import awq_nb  # noqa: E402
from awq_nb.arch import block_linears, get_blocks, get_spec, weight_nk  # noqa: E402
from awq_nb.capture import capture_inputs  # noqa: E402
from awq_nb.quantizer import quant_params  # noqa: E402
from awq_nb.rounding import from_int_codes, gptq, rtn  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/gv")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--track", default=None, help="comma-separated variants of bench/gptq_variants.py to follow")
    ap.add_argument("--blocks", type=int, default=None, help="with --track: how many blocks (default all)")
    a = ap.parse_args(argv)
    model, tok = awq_nb.load_model("smollm2-135m")
    calib = awq_nb.calibration_blocks(tok, gv.CALIB, n_samples=24, seqlen=512, seed=0)
    base = gv.scaled_model(model, awq_nb.AWQResult.load(Path(a.workdir) / "search.safetensors"))
    spec = get_spec(base)
    inp = capture_inputs(base, spec, calib, torch.device("cpu"))
    fit, held = slice(0, 16), slice(16, 24)
    if a.track:
        result = awq_nb.AWQResult.load(Path(a.workdir) / "search.safetensors")
        return track(base, spec, inp, result, a.track.split(","), a.blocks, fit, held)
    hfp, hq = inp.hidden.clone(), inp.hidden.clone()
    qmodel = copy.deepcopy(base)
    for i in range(a.block):  # the quantized path: blocks before a.block rounded to nearest
        gv.forward_(get_blocks(base, spec)[i], hfp, inp.args[i], inp.kwargs[i])
        for m in block_linears(get_blocks(qmodel, spec)[i]).values():
            w = weight_nk(m)
            s, z = quant_params(w, 4, 64, True)
            w.copy_(from_int_codes(rtn.round_weight(w, s, z, 4, 64), s, z, 4, 64, "rtn").dequantize())
        gv.forward_(get_blocks(qmodel, spec)[i], hq, inp.args[i], inp.kwargs[i])
    i, fb = a.block, get_blocks(base, spec)[a.block]
    args, kwargs = inp.args[i], inp.kwargs[i]
    gr, cr = gv.asym_grams(fb, copy.deepcopy(fb), hfp[fit].clone(), hq[fit].clone(), args, kwargs)
    grh, crh = gv.asym_grams(fb, copy.deepcopy(fb), hfp[held].clone(), hq[held].clone(), args, kwargs)
    _, hfh = gv.asym_grams(fb, copy.deepcopy(fb), hfp[held].clone(), hfp[held].clone(), args, kwargs)

    def err(w, q, n):  # ||X W^T - X~ Q^T||^2 on the held-out sequences, from their (cross) Grams
        return float((w @ hfh[n] * w).sum() - 2 * (w @ crh[n] * q).sum() + (q @ grh[n] * q).sum())

    print(f"block {i}, held-out error ||X W^T - X~ Q^T||^2 (blocks 0-{i - 1} rounded to nearest)")
    print("| Linear | W | GPTQ(W) | " + " | ".join(f"W* l={lam} | GPTQ(W*) l={lam}" for lam in (0.1, 1.0, 10.0)) + " |")
    for n, m in block_linears(fb).items():
        w = weight_nk(m).float()
        s, z = quant_params(w, 4, 64, True)

        def rounded(aim):
            q = gptq.round_weight(aim, s, z, 4, 64, gr[n], damp=0.1, act_order=True, shrink=0.0, descent=0)
            return from_int_codes(q, s, z, 4, 64, "gptq").dequantize()
        cells = [err(w, w, n), err(w, rounded(w), n)]
        for lam in (0.1, 1.0, 10.0):
            ws = gv.asym_target(w, gr[n], cr[n], lam)
            cells += [err(w, ws, n), err(w, rounded(ws), n)]
        print(f"| {n} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    return 0


def track(base, spec, inp, result, names, n_blocks, fit, held) -> int:
    """``--track``: each variant's quantized path, block by block (module docstring)."""
    clips = {f"{spec.blocks}.{c.block}.{c.layer}": c for c in result.clips}
    variants = {t: gv.parse_variant(t) for t in names}
    paths = {t: (copy.deepcopy(base), inp.hidden.clone()) for t in variants}
    hfp = inp.hidden.clone()
    fp_blocks = get_blocks(base, spec)
    print("block | " + " | ".join(f"{t}: held-out / fitted" for t in variants))
    for i in range(len(fp_blocks) if n_blocks is None else n_blocks):
        args, kwargs = inp.args[i], inp.kwargs[i]
        cells = []
        for t, v in variants.items():
            model, hidden = paths[t]
            block = get_blocks(model, spec)[i]
            gv.round_block(v, block, fp_blocks[i], hidden[fit], hfp[fit], args, kwargs, clips, f"{spec.blocks}.{i}",
                           4, 64, {})
            gv.forward_(block, hidden, args, kwargs)
        gv.forward_(fp_blocks[i], hfp, args, kwargs)
        for model, hidden in paths.values():  # both paths after block i
            rel = [float((hidden[s, 1:] - hfp[s, 1:]).norm() / hfp[s, 1:].norm()) for s in (held, fit)]
            cells.append(f"{rel[0]:.4f} / {rel[1]:.4f}")
        print(f"{i} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
