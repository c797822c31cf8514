#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite. Fails when a test fails or none ran.
#   bash scripts/test.sh                                     # Python 3.11, megatron-core 0.16.1
#   PYTHON=... VENV=.venv312 MCORE=0.19.2 bash scripts/test.sh   # another interpreter / megatron-core
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The test of wit-inspect's HTML page renders it in a real headless browser: Debian's chromium package.
if ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
