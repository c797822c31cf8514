#!/usr/bin/env bash
# Set up (see setup.sh) and run the CPU demo: WIT training of a tiny GPT at tp2 x pp2 over gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/torchrun" --nproc-per-node 4 examples/pretrain_wit.py --tp 2 --pp 2 "$@"
