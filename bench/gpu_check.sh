#!/usr/bin/env bash
# One short run for a lent GPU machine (not part of CI, never part of `make test`):
#   1. the @gpu tests;
#   2. the builtin engine against vLLM on a real-shape model (Qwen2.5-0.5B's shape, random weights, bf16):
#      generated tokens/s at 1, 16 and 64 streaming clients, through bench/serve.py.
# Figures go to $OUT (default bench/out/gpu): gpu.csv (the device), gpu-tests.txt, serve-*.json and .png.
# vLLM is measured only where a CUDA build sits in ${BENCH_PEERS_HOME:-/work/.cache/bench}/vllm-venv (a lent
# machine reaches no registry, so nothing is installed here); otherwise the builtin engine alone, and notes.txt
# says so.
#
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
: > "$OUT/notes.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
# `|| true`: a failing GPU test is a figure to read in gpu-tests.txt, not a reason to skip the measurement.
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/inference 2>&1 | tee "$OUT/gpu-tests.txt" || true

servers="appliance"
if [ -x "${BENCH_PEERS_HOME:-/work/.cache/bench}/vllm-venv/bin/vllm" ]; then
    servers="appliance vllm"
else
    echo "no vLLM virtualenv on this machine: the builtin engine alone was measured" | tee -a "$OUT/notes.txt"
fi
"$PY" bench/shapes.py --names qwen2.5-0.5b-shape
# shellcheck disable=SC2086  # $servers is a list of words
APPLIANCE_DEVICE=cuda APPLIANCE_ENGINE_PRECISION=bfloat16 "$PY" bench/serve.py --models qwen2.5-0.5b-shape \
    --levels 1 16 64 --servers $servers --skip-in-process --out "$OUT"
