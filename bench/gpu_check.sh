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

echo "== GPU tests (pytest -k gpu): streaming and training on cuda"
timeout 60 "$PY" -m pytest -q -k gpu -p no:cacheprovider tests

echo "== figures 1-8 on cuda (short rounds)"
timeout 150 "$PY" bench/speed.py --device cuda --quick --out "$OUT"

echo "== figure 9 on cuda"
timeout 80 "$PY" bench/scaling.py --device cuda --sizes 14M 124M --out "$OUT"

"$PY" bench/report.py --results "$OUT" --device cuda --command "bench/gpu_check.sh" >/dev/null
echo "== wrote $OUT/RESULTS-cuda.md in $(( $(date +%s) - start )) s"
