#!/usr/bin/env bash
# The README's test command: install (if needed) and run the whole suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# report.html is checked in headless Chromium (Debian's chromium package): install it when missing, quietly
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root=""; [ "$(id -u)" = 0 ] || as_root="sudo -n"
  { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium (apt-get install -y chromium); the report.html test will skip" >&2
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CMALIGN_CACHE="${CMALIGN_TEST_CACHE:-$(mktemp -d)}"
python -m pytest -n 2 --dist loadgroup -q --durations=15 "$@"
