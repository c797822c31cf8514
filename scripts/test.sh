#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite. Fails when a test fails or none ran.
#   bash scripts/test.sh                                     # Python 3.11, megatron-core 0.16.1
#   PYTHON=... VENV=.venv312 MCORE=0.19.2 bash scripts/test.sh   # another interpreter / megatron-core
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
