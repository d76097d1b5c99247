#!/usr/bin/env bash
# One device call on a lent H100/H200 (about 8 minutes), from the repository root:
#
#     bash bench/gpu_check.sh        # device tool: command "bash bench/gpu_check.sh", timeout_s 540
#
# Rehearse it here first, at no device time:  PYTHON=.venv/bin/python BENCH_ARGS=--dry-run bash bench/gpu_check.sh
#
# 1. the GPU, driver, torch/triton versions, and the measured ceilings (copy GB/s, fp16 TFLOP/s);
# 2. bench/kernels.py matmul table: 8 Llama shapes x 12 batch sizes, every INT4 strategy timed and
#    checked against x @ dequantized W (fails on a relative error above 1e-2);
# 3. bench/kernels.py decode: fp16 vs AWQ tokens/s, transformers eager and CUDA-graph replay;
# 4. tests/test_kernels.py and tests/test_graph_decode.py compiled on the GPU (no interpreter).
# Each phase has its own time limit, and every phase writes its results to $OUT as it goes, so a
# slow phase cannot lose an earlier one. $OUT/kernels_gpu.md is the report for docs/benchmarks.md.
# The device image has no editable install of awq_nb, so the package is assembled under /tmp
# (awq_nb/ plus kernels/ as awq_nb/kernels, the mapping pyproject.toml makes).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
START=$(date +%s)
REPORT="$OUT/kernels_gpu.md"
elapsed() { echo "$(( $(date +%s) - START )) s"; }

SITE=/tmp/awq_nb_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r awq_nb "$SITE/awq_nb" && rm -rf "$SITE/awq_nb/kernels" && cp -r kernels "$SITE/awq_nb/kernels"
export PYTHONPATH="$SITE:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| capability', torch.cuda.get_device_capability())"
  echo '```'
} 2>&1 | tee "$REPORT"

echo "## matmul ($(elapsed))" | tee -a "$REPORT"
timeout 200 $PY bench/kernels.py ${BENCH_ARGS:-} --no-decode --json "$OUT/matmul.json" --markdown "$OUT/matmul.md" 2>&1 \
  | tee "$OUT/matmul.log"
echo "matmul exit status: ${PIPESTATUS[0]} ($(elapsed))" | tee -a "$REPORT"
if [ -s "$OUT/matmul.md" ]; then cat "$OUT/matmul.md" >> "$REPORT"; else grep '^|' "$OUT/matmul.log" >> "$REPORT"; fi

echo "## decode ($(elapsed))" | tee -a "$REPORT"
timeout 200 $PY bench/kernels.py ${BENCH_ARGS:-} --decode-only --json "$OUT/decode.json" --markdown "$OUT/decode.md" 2>&1 \
  | tee "$OUT/decode.log"
echo "decode exit status: ${PIPESTATUS[0]} ($(elapsed))" | tee -a "$REPORT"
grep '^| [A-Za-z]' "$OUT/decode.log" | sort -u >> "$REPORT"

echo "## tests on the GPU ($(elapsed))" | tee -a "$REPORT"
XDIST="-n 8"
$PY -c "import xdist" 2>/dev/null || XDIST=""
timeout 100 $PY -P -m pytest tests/test_kernels.py tests/test_graph_decode.py -q -p no:cacheprovider $XDIST \
  --durations=5 2>&1 | tee "$OUT/tests_gpu.log"
echo "tests exit status: ${PIPESTATUS[0]} ($(elapsed))" | tee -a "$REPORT"
tail -n 12 "$OUT/tests_gpu.log" >> "$REPORT"

echo "## summary ($(elapsed))"
grep -A 16 'Fastest strategy' "$OUT/matmul.md" 2>/dev/null
grep '^| [A-Za-z]' "$OUT/decode.log" | sort -u
tail -n 3 "$OUT/tests_gpu.log"
