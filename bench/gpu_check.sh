#!/usr/bin/env bash
# One device call on a lent H100/H200 (budget: under 8 minutes), from the repository root:
#
#     bash bench/gpu_check.sh        # run tool: command "bash bench/gpu_check.sh", timeout_s 560
#
# 1. prints the GPU (nvidia-smi) and the torch/triton versions;
# 2. runs tests/test_kernels.py compiled on the GPU (no interpreter), 8 pytest-xdist workers so
#    the Triton compiles of the autotune candidates run in parallel;
# 3. runs the full benchmark (bench/kernels.py: 8 shapes x 12 batch sizes, then decode).
# Everything goes to $OUT (kernels_gpu.md is the summary to paste into docs/kernels.md).
# The device image has no editable install of awq_nb, so the package is assembled under /tmp
# (awq_nb/ plus kernels/ as awq_nb/kernels, the mapping pyproject.toml makes).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
START=$(date +%s)
REPORT="$OUT/kernels_gpu.md"

SITE=/tmp/awq_nb_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r awq_nb "$SITE/awq_nb" && rm -rf "$SITE/awq_nb/kernels" && cp -r kernels "$SITE/awq_nb/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| capability', torch.cuda.get_device_capability())"
  echo '```'
} 2>&1 | tee "$REPORT"

echo "## tests/test_kernels.py on the GPU" | tee -a "$REPORT"
XDIST="-n 8"
$PY -c "import xdist" 2>/dev/null || XDIST=""
timeout 240 $PY -m pytest tests/test_kernels.py -q -p no:cacheprovider $XDIST --durations=5 2>&1 | tee "$OUT/tests_gpu.log"
echo "tests exit status: ${PIPESTATUS[0]} ($(( $(date +%s) - START )) s since start)" | tee -a "$REPORT"
tail -n 3 "$OUT/tests_gpu.log" >> "$REPORT"

LEFT=$(( 470 - ($(date +%s) - START) ))
echo "## benchmark (limit ${LEFT} s)" | tee -a "$REPORT"
timeout "$LEFT" $PY bench/kernels.py --json "$OUT/kernels_bench.json" --markdown "$OUT/kernels_bench.md" \
  2>&1 | tee "$OUT/bench.log"
echo "bench exit status: ${PIPESTATUS[0]} ($(( $(date +%s) - START )) s since start)" | tee -a "$REPORT"
if [ -s "$OUT/kernels_bench.md" ]; then cat "$OUT/kernels_bench.md" >> "$REPORT"
else grep '^|' "$OUT/bench.log" >> "$REPORT"; fi  # rows printed before a timeout
