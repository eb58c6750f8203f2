#!/usr/bin/env bash
# Create .venv (if missing) and install cmalign with a CPU build of torch pinned, so that a fresh
# machine never pulls a multi-GB CUDA build. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import cmalign, torch, diffusers, peft" 
