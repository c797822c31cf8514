"""WIT inside Megatron-LM's own training loop: `megatron.training.pretrain()` runs
examples/megatron_lm/pretrain_gpt_wit.py at tp2 x pp2 (4 processes, gloo) on a converted
tiny Llama with SmolLM2's vocabulary and HumanEval preprocessed with SmolLM2's tokenizer, packed
(per-record attention masks on the local spec).

Proven here:
- the `lm loss` (and prompt / response NLL) pretrain() logs per iteration equals examples/pretrain_wit.py's
  on the same checkpoint, data, seed and layout to 1e-6 relative (the grad norm to 1e-5), and iteration 1
  equals transformers' forward on the same samples with the paper's formula to 1e-5 (the grad norm of
  Σ w·NLL / N to 1e-4);
- `--finetune` from the converted checkpoint, a `--save-interval` save, a stop (`--exit-interval`) and a
  resume from that save that continues with the uninterrupted run's losses; the resume runs the chunked
  output layer (`--wit-loss-impl chunked`, 64-token chunks: logits recomputed in the backward pass), so
  its losses and grad norms equal the unfused path's through Megatron-LM's schedule and optimizer;
- the save converts to HF (wit-convert-megatron-to-hf) and wit-verify-conversion passes on it;
- without `--calculate-per-token-loss` the launch stops with the reason, not a traceback; WIT's forward
  step refuses too (a launch whose arguments bypass the parser's check), and the dataset provider
  refuses data with more token ids than the model's padded vocabulary.

Megatron-LM's `megatron.training` ships in megatron-core's wheel from 0.17 on: these tests run on the
0.19.2 leg and are skipped on 0.16.1, whose wheel has none.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.training_data import ROOT, datasets_of, hf_reference
from wit_megatron.runtime import compat
from wit_megatron.runtime.launch import run_distributed

pytestmark = pytest.mark.skipif(not compat.ships_megatron_training(),
                                reason="this megatron-core wheel has no megatron.training (0.16.1): runs on the 0.19.2 leg")

EXAMPLE = ROOT / "examples/megatron_lm/pretrain_gpt_wit.py"
KEYS = ("lm loss", "prompt nll", "response nll")
# Megatron-LM's defaults that differ from examples/pretrain_wit.py's are set to the same values for both;
# clipping at 0.5 acts at every iteration here (grad norms 0.6-0.9), so later losses depend on the norm too.
SAME_RUN = ["--split", "100,0,0", "--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "4", "--lr", "1e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--weight-decay", "0.1",
            "--clip-grad", "0.5",
            "--lambda-prompt", "0.2", "--lambda-response", "0.8", "--num-workers", "0"]
# Megatron-LM on CPU: the local layer spec, gloo, no fused CUDA kernels; no dropout (pretrain_wit.py has none).
MEGATRON_LM_CPU = ["--transformer-impl", "local", "--distributed-backend", "gloo", "--no-masked-softmax-fusion",
                   "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                   "--no-persist-layer-norm", "--attention-dropout", "0", "--hidden-dropout", "0"]


def megatron_lm_argv(data: dict, *extra: str) -> list[str]:
    flags = (data["tiny"] / "megatron_lm_flags.txt").read_text().split()
    return [*flags, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--data-path", data["he"],
            "--data-cache-path", str(data["tmp"] / "cache"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "49152",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", *SAME_RUN, *MEGATRON_LM_CPU, *extra]


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """What pretrain() wrote to TensorBoard: per key, iteration -> that iteration's value (its stdout
    line at iteration 2 averages iterations 1-2: its first line does not reset the log interval)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory)).Reload()
    return {key: {e.step: e.value for e in events.Scalars(key)} for key in (*KEYS, "grad-norm")}


@pytest.fixture(scope="module")
def runs(training_data):
    """Two launches of the example on 4 ranks, --finetune from the converted checkpoint (saves iteration 2
    and stops) and the resume from that save (iterations 3-4, chunked output layer), then pretrain_wit.py
    on the same options (unfused);
    then the last save converted to HF and verified with the converter's command-line tools."""
    tmp, save = training_data["tmp"] / "megatron-lm", training_data["tmp"] / "megatron-lm" / "run"
    launches = [
        megatron_lm_argv(training_data, "--calculate-per-token-loss", "--load", str(training_data["tiny"]), "--finetune",
                         "--save", str(save), "--save-interval", "2", "--exit-interval", "2",
                         "--tensorboard-dir", str(tmp / "tb-first")),
        megatron_lm_argv(training_data, "--calculate-per-token-loss", "--load", str(save), "--save", str(save),
                         "--save-interval", "2", "--tensorboard-dir", str(tmp / "tb-resumed"),
                         "--wit-loss-impl", "chunked", "--wit-loss-chunk-size", "64"),
    ]
    wit_argv = ["--load", str(training_data["tiny"]), "--data-path", training_data["he"], "--tp", "2", "--pp", "2",
                "--data-cache-path", str(training_data["tmp"] / "cache"), "--log-interval", "1", *SAME_RUN]
    ranks = run_distributed("tests.scenarios.megatron_lm:runs", 4, timeout_s=1200, megatron_lm=launches,
                            pretrain_wit=wit_argv, save=str(save))
    exported = tmp / "hf"
    for tool, args in (("convert_megatron_to_hf.py", ["--megatron", str(save), "--out", str(exported)]),
                       ("verify_conversion.py", ["--hf", str(exported), "--megatron", str(save)])):
        done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / tool), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (tool, done.stdout[-3000:], done.stderr[-3000:])
    return {"launches": ranks[-1]["launches"], "save": save, "exported": exported, "verified": json.loads(done.stdout),
            "tensorboard": [tensorboard_scalars(tmp / "tb-first"), tensorboard_scalars(tmp / "tb-resumed")],
            "pretrain_wit": ranks[-1]["pretrain_wit"], "wit_argv": wit_argv}


def test_pretrain_logs_pretrain_wits_loss_and_transformers_loss_at_iteration_one(training_data, runs):
    first, resumed = runs["tensorboard"]
    assert [sorted(first["lm loss"]), sorted(resumed["lm loss"])] == [[1, 2], [3, 4]]
    wit_log = runs["pretrain_wit"]["train_log"]
    assert [line["iteration"] for line in wit_log] == [1, 2, 3, 4]
    for key in KEYS:
        megatron_lm = [{**first[key], **resumed[key]}[i] for i in (1, 2, 3, 4)]
        assert megatron_lm == pytest.approx([line[key] for line in wit_log], rel=1e-6), key
    # The norm both clip by (at 1.0): every tensor-parallel shard counted once.
    grad_norms = [{**first["grad-norm"], **resumed["grad-norm"]}[i] for i in (1, 2, 3, 4)]
    assert grad_norms == pytest.approx([line["grad-norm"] for line in wit_log], rel=1e-5)

    train, _ = datasets_of(runs["wit_argv"], world_size=4)
    samples = [train[i] for i in range(8)]
    assert max(int(s["document_ids"].max()) for s in samples) >= 1  # packed: several records per sequence
    reference = hf_reference(training_data["tiny_hf"], samples, grad_norm=True)
    for key in KEYS:
        assert first[key][1] == pytest.approx(reference[key]["loss"], rel=1e-5), key
    assert first["grad-norm"][1] == pytest.approx(reference["grad norm"], rel=1e-4)


def test_finetune_save_stop_and_resume(runs):
    """The first launch loads the converted weights (iteration 1 above), saves at iteration 2 and stops
    there (its TensorBoard has iterations 1-2); the second resumes from that save at iteration 3 and
    saves the last."""
    first, resumed = runs["launches"]
    assert first == {"status": 0, "tracker": "2"} and resumed == {"status": 0, "tracker": "4"}
    for iteration in (2, 4):
        assert (runs["save"] / f"iter_{iteration:07d}" / "metadata.json").is_file()


def test_the_save_converts_to_hf_and_verifies(training_data, runs):
    from safetensors.torch import load_file

    verified = runs["verified"]
    assert verified["ok"] and verified["max_abs_diff"] <= 1e-4 and verified["top1_agreement"] == 1.0
    exported = load_file(runs["exported"] / "model.safetensors")
    original = load_file(training_data["tiny_hf"] / "model.safetensors")
    assert exported.keys() == original.keys()
    assert not all(torch.equal(exported[k], original[k]) for k in exported)  # the trained weights, not the converted ones
    assert (runs["exported"] / "tokenizer.json").is_file()


def test_a_launch_without_per_token_loss_stops_with_the_reason(training_data):
    argv = megatron_lm_argv(training_data, "--load", str(training_data["tiny"]), "--finetune")
    run = subprocess.run([sys.executable, str(EXAMPLE), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "pretrain_gpt_wit.py: error: WIT needs --calculate-per-token-loss" in run.stderr
    assert "mean of means" in run.stderr and "Traceback" not in run.stderr


def test_wit_refuses_a_launch_that_bypassed_the_parser_or_has_too_few_embedding_rows(training_data):
    """Arguments that did not come through add_wit_args' parser (e.g. a YAML config): WIT's forward step
    stops at the first micro-batch, with the same reason. A chunk size of 0 is refused by the check the
    parser runs. Data tokenized with more ids than the model's
    padded vocabulary: the dataset provider stops before building anything."""
    import argparse

    from megatron.training import global_vars

    from wit_megatron.integrations.megatron_lm import (PER_TOKEN_LOSS_REQUIRED, WITArgumentError, check_wit_args,
                                                       forward_step, train_valid_test_datasets_provider)

    data_args = dict(data_path=[training_data["he"]], data_args_path=None, train_data_path=None, valid_data_path=None,
                     test_data_path=None, per_split_data_args_path=None)
    try:
        global_vars.set_args(argparse.Namespace(calculate_per_token_loss=False))
        with pytest.raises(WITArgumentError) as refused:
            forward_step(iter([]), None)
        assert str(refused.value) == PER_TOKEN_LOSS_REQUIRED
        chunk_size_zero = argparse.Namespace(calculate_per_token_loss=True, lambda_prompt=0.2, lambda_response=0.8,
                                             lambda_system=None, lambda_user=None, lambda_tool=None, mock_data=False,
                                             wit_loss_impl="chunked", wit_loss_chunk_size=0, **data_args)
        with pytest.raises(WITArgumentError, match="chunk_size must be >= 1 token, got 0"):
            check_wit_args(chunk_size_zero)
        global_vars.set_args(argparse.Namespace(padded_vocab_size=49151, **data_args))
        with pytest.raises(WITArgumentError, match="vocabulary of 49152 ids, but the model has 49151 embedding rows"):
            train_valid_test_datasets_provider([8, 0, 0])
    finally:
        global_vars.set_args(None)
