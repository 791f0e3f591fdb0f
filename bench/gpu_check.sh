#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests, then the speed benchmarks on cuda (short rounds),
# in under 5 minutes. Writes bench/results/speed-cuda.json, scaling-cuda.json and RESULTS-cuda.md
# (and bench/results/gpu_check.log).
#
#     bench/gpu_check.sh            (PY=/path/to/python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)')); nothing run" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
start=$(date +%s)

failed=()
stage() {  # stage NAME SECONDS CMD...: run one stage under a time limit; a failure does not stop the rest
    local name=$1 limit=$2; shift 2
    echo "== $name"
    local t0=$(date +%s)
    if timeout "$limit" "$@"; then echo "== $name: ok in $(( $(date +%s) - t0 )) s"
    else echo "== $name: FAILED (rc $?) after $(( $(date +%s) - t0 )) s"; failed+=("$name"); fi
}
"$PY" -c "import torch, transformers, fastapi, sqlalchemy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'fastapi', fastapi.__version__, 'sqlalchemy', sqlalchemy.__version__)"

# (named files: the other test modules import dev-only packages a GPU image may lack)
stage "GPU tests: streaming and training on cuda" 90 \
    "$PY" -m pytest -q -p no:cacheprovider -k gpu tests/test_streaming.py tests/test_settings.py
stage "figures 1-8 on cuda (short rounds)" 240 "$PY" bench/speed.py --device cuda --quick --out "$OUT"
stage "figure 9 on cuda" 150 "$PY" bench/scaling.py --device cuda --sizes 14M 124M --out "$OUT"
stage "report" 30 "$PY" bench/report.py --results "$OUT" --device cuda --command "bench/gpu_check.sh"
echo "== done in $(( $(date +%s) - start )) s; failed stages: ${#failed[@]} ${failed[*]:-}"
[ ${#failed[@]} -eq 0 ]
