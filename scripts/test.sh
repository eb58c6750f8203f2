#!/usr/bin/env bash
# The README's test command: install (if needed) and run the whole suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CMALIGN_CACHE="${CMALIGN_TEST_CACHE:-$(mktemp -d)}"
python -m pytest -n 2 -q "$@"
