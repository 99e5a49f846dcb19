#!/usr/bin/env bash
# One call on a GPU machine: the whole test suite (the CUDA tests, and the CPU tests as they run on
# a machine with a GPU) and every GPU benchmark, results in one folder.
#
#   bash bench/gpu_suite.sh [OUTDIR]      # default: $OUT if set (device tool), else bench/results
#   SUITE_BENCH="" bash bench/gpu_suite.sh  # the tests only; SUITE_BENCH=step: one bench
#
# Uses the machine's own torch/triton (installs nothing); run from the repo root.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 BENCH_RESULTS="$out"
log="$out/gpu_suite.log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"
status=0
run() { echo "=== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; }
run python3 -m pytest -q -p no:cacheprovider tests ${SUITE_PYTEST_ARGS:-}
for module in ${SUITE_BENCH-step graphs large_batch_step}; do
  run python3 -m bench."$module"
done
echo "gpu_suite exit status: $status" | tee -a "$log"
exit $status
