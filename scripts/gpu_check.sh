#!/usr/bin/env bash
# The prepared GPU check (issue 15): engine-level and Ray-free, a capability probe then stages
# (parity, speed in bf16 and FP8, transformers' generate), each writing its JSON before the next
# starts; the table goes to stdout and to $MOE_GPU_CHECK_TABLE (default OUT_DIR/table.md). About
# 5 minutes on an H200, at most --budget-s (460 s) for all stages. See ops/bench/gpu_check.py.
#
# Here (a CPU machine with the project's venv, mistral-common and a package index), once:
#   scripts/gpu_check.sh --prepare   # parity checkpoints -> .gpu_check/ckpt; llguidance's wheel -> .whl/
# On the GPU machine (carry .gpu_check and .whl; no network, Ray, DeepSpeed or mistral-common there):
#   scripts/gpu_check.sh                         # or: GPU_CHECK_OUT=dir scripts/gpu_check.sh --table FILE
# Here, the whole check on tiny sizes (what tests/unit/test_bench_gpu_check_smoke.py runs):
#   scripts/gpu_check.sh --device cpu --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--prepare" ]]; then
  shift
  # The committed references (ops/bench/gpu_check_refs/) stay; the checkpoints' fingerprints must
  # match theirs (the check says so when they do not). Drop --no-refs to recompute them.
  "$PY" -m ops.bench.gpu_check_refs --no-refs "$@"
  # The engine imports llguidance (structured output); the GPU machine lacks it.
  version="$("$PY" -c 'import importlib.metadata as m; print(m.version("llguidance"))')"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "llguidance==$version"
  exit 0
fi
if [[ -d .whl ]] && ! "$PY" -c "import llguidance" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT_DIR="${GPU_CHECK_OUT:-${OUT:-/tmp}/gpu_check}"
export MOE_GPU_CHECK_TABLE="${MOE_GPU_CHECK_TABLE:-$OUT_DIR/table.md}"
exec "$PY" -m ops.bench.gpu_check --out "$OUT_DIR" "$@"
