#!/usr/bin/env bash
# SmolLM2-135M-Instruct 8K -> 32K on one GPU, every phase in one command, 20 minutes (see gpu_run.py's docstring):
#   bash recipes/smollm2_32k/gpu_run.sh GGUF OUT [gpu_run.py flags...]
#   setsid nohup bash recipes/smollm2_32k/gpu_run.sh GGUF OUT >/dev/null 2>&1 &    # detached: tail OUT/gpu_run.log
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${1:?usage: bash recipes/smollm2_32k/gpu_run.sh GGUF OUT [flags]}
OUT=${2:?usage: bash recipes/smollm2_32k/gpu_run.sh GGUF OUT [flags]}
shift 2
exec "${PYTHON:-python3}" recipes/smollm2_32k/gpu_run.py --gguf "$GGUF" --out "$OUT" "$@"
