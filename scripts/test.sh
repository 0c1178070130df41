#!/usr/bin/env bash
# Sets up a virtual environment (on a fresh machine too) and runs the test suite.
# Arguments go to pytest, e.g. `scripts/test.sh -m unit` for the quick tier (no Ray); the tiers
# are markers (pyproject.toml, tests/conftest.py): unit, integration, e2e, slow, gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch first: a range alone would pull a multi-gigabyte CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# promtool and prometheus (ops/prometheus tests) from Debian's package, once per machine.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
ruff check .
# Type check of cluster/ and deployments/ ([tool.mypy] in pyproject.toml).
mypy
exec python -m pytest "$@"
