"""Where does AWQ + GPTQ's perplexity gap sit? (issue #17, docs/rounding.md)

On SmolLM2 (bundled), with bench/gptq_variants.py's search cache (``--workdir``): the model of one
variant (default ``act+damp0.1``, the engine's GPTQ) is built once; then one group of Linears at a
time is put back to its scaled fp weight (the same function as the fp model), and perplexity is
measured on the first ``--windows`` 1024-token windows of the 1990+ speeches. The drop from the
fully quantized model is that group's share of the gap: by Linear type, by five blocks, and for
single blocks (``--single``).

    python bench/gptq_variants.py --workdir /tmp/gv --search-only    # once
    python bench/gap_by_linear.py --workdir /tmp/gv --windows 4
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
from awq_nb.arch import block_linears, get_blocks, weight_nk  # noqa: E402
from awq_nb.evaluate import perplexity  # noqa: E402
from awq_nb.settings import FULL  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/gv")
    ap.add_argument("--variant", default="act+damp0.1")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--single", default="0,1,29", help="blocks restored one at a time (comma-separated)")
    a = ap.parse_args(argv)
    model, tok = awq_nb.load_model("smollm2-135m")
    calib = awq_nb.calibration_blocks(tok, gv.CALIB, n_samples=32, seqlen=FULL.seqlen, seed=FULL.seed)
    work = Path(a.workdir)
    result = awq_nb.AWQResult.load(work / "search.safetensors")
    base = gv.scaled_model(model, result)
    windows = awq_nb.eval_windows(tok, gv.EVAL, seqlen=FULL.eval_seqlen, max_windows=a.windows)
    quant, _ = gv.build(gv.parse_variant(a.variant), base, result, torch.load(work / "grams.pt"), calib, 4, 64)
    fp_blocks = get_blocks(base)

    def ppl(m) -> float:
        return perplexity(m, windows=windows)["perplexity"]

    def restored(pick) -> float:
        m = copy.deepcopy(quant)
        for i, block in enumerate(get_blocks(m)):
            for n, lin in block_linears(block).items():
                if pick(i, n):
                    weight_nk(lin).copy_(weight_nk(block_linears(fp_blocks[i])[n]))
        return ppl(m)

    fp, q = ppl(base), ppl(quant)
    print(f"# {a.variant}, {int(windows.shape[0])} windows: fp {fp:.3f}, quantized {q:.3f} (gap {q - fp:+.3f})")
    print("| restored to fp | perplexity | share of the gap |\n|---|---|---|")
    n_blocks = len(fp_blocks)
    groups = [(t, lambda i, n, t=t: n.endswith(t)) for t in
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    groups += [(f"blocks {lo}-{min(lo + 4, n_blocks - 1)}", lambda i, n, lo=lo: lo <= i < lo + 5)
               for lo in range(0, n_blocks, 5)]
    groups += [(f"block {b}", lambda i, n, b=b: i == b) for b in map(int, filter(None, a.single.split(",")))]
    for label, pick in groups:
        p = restored(pick)
        print(f"| {label} | {p:.3f} | {(q - p) / (q - fp):.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
