#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): Llama-3-8B shape, at most 8 minutes, one JSON.
# Usage: bash scripts/gpu_check.sh [OUT.json] [extra gpu_check.py flags, e.g. --shape 1b]
set -u
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check.json}"
shift || true
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
timeout --signal=INT 470 "$PY" scripts/gpu_check.py --device cuda --out "$OUT" --budget 420 "$@"
status=$?
echo "gpu_check exit $status; results in $OUT"
exit $status
