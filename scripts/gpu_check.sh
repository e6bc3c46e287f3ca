#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA-marked tests, every benchmark on the GPU, one full-scale
# experiment under the Ray executor (one run per GPU share), and each experiment's --scale paper config (the
# paper's dataset, model and budget; fetch the data first with `backproplab data get NAME`); writes
# docs/gpu.md with what ran and how long it took.
# Usage: scripts/gpu_check.sh [EXPERIMENT] (default: curveball); PAPER=0 skips the paper-scale runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EXP=${1:-curveball}
OUT=docs/gpu.md
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
log=$(mktemp)
step() {  # step TITLE COMMAND...: run it, time it, keep its output
    local title=$1; shift
    local start end
    start=$(date +%s)
    { echo; echo "## $title"; echo; echo '```'; echo "\$ $*"; } >> "$log"
    if "$@" >> "$log" 2>&1; then status=ok; else status="failed ($?)"; fi
    end=$(date +%s)
    { echo '```'; echo; echo "$status in $((end - start)) s"; } >> "$log"
}
{
    echo "# GPU check ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD))"
    echo
    echo "Device: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda, torch.__version__)")"
} > "$log"
step "CUDA-marked tests" "$PY" -m pytest -q -m cuda tests
for bench in benchmarks/bench_*.py; do
    step "benchmark $(basename "$bench" .py)" "$PY" "$bench" --device cuda --repeats 20
done
step "full-scale $EXP on Ray, half a GPU per run" .venv/bin/backproplab run "$EXP" --executor ray \
    --gpus-per-run 0.5 --cpus-per-run 2 --out results_gpu --no-progress
if [ "${PAPER:-1}" = 1 ]; then
    for exp in $("$PY" -c "from backproplab import experiments; print(' '.join(experiments.paper_scale_names()))"); do
        step "paper-scale $exp on the GPU" .venv/bin/backproplab run "$exp" --scale paper --device cuda \
            --out results_paper --no-progress
    done
fi
mv "$log" "$OUT"
echo "gpu_check: wrote $OUT"
