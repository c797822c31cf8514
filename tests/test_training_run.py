"""The training entry point as users run it (wit_megatron.training, examples/pretrain_wit.py).

Proven here, against independent references and uninterrupted runs:
- iteration 1's logged `lm loss` and the validation losses equal transformers' forward on the same
  samples with the paper's formula (real SmolLM2-135M at tp1pp1 dp6 with the distributed optimizer and
  at tp3pp2; a tiny model at tp2pp2 with a virtual pipeline, packed; a tiny Gemma-2 at tp2pp2, packed,
  whose run then exports to HF);
- a run stopped after iteration k (--exit-interval, SIGTERM) and resumed gives bitwise the losses and
  weights of the uninterrupted run: plain optimizer with packing, distributed optimizer without packing
  across an epoch boundary;
- a resume at other TP/PP/DP layouts continues with the uninterrupted run's losses to 1e-6;
- two torchrun agents acting as two nodes give the single-launch losses, and TensorBoard gets the logged
  values; bad options are refused before any process group exists; the loss falls on a small overfit run.
"""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert_models import randomize
from tests.training_data import convert, datasets_of, hf_reference
from wit_megatron.runtime.launch import run_distributed
from wit_megatron.testing import smollm2

ROOT = Path(__file__).resolve().parents[1]


def logged(result: dict, key: str = "lm loss") -> list[float]:
    return [line[key] for line in result["train_log"]]


def last_stage(results: list[dict], job: int) -> dict:
    """A job's results from the last rank (which logs)."""
    return results[-1][job]


# ---- iteration 1 and validation against transformers, on the real SmolLM2-135M -----------------------


@pytest.fixture(scope="module")
def smollm2_runs(training_data):
    checkpoint = convert(smollm2.smollm2_dir(), training_data["tmp"] / "smollm2-megatron")
    argv = ["--load", str(checkpoint), "--data-path", training_data["he"], "--split", "90,10,0", "--seq-length", "256",
            "--no-packing", "--micro-batch-size", "1", "--global-batch-size", "6", "--train-iters", "1", "--lr", "0", "--eval-iters", "3",
            "--eval-interval", "1", "--log-interval", "1", "--lambda-prompt", "0.2", "--lambda-response", "0.8",
            "--data-cache-path", str(training_data["tmp"] / "cache"), "--num-workers", "0"]
    # Memory: six full replicas of a 135M model with Adam state fill most of a 24 GiB machine, so dp6 shards
    # the optimizer (ZeRO-1), and no loader workers are forked (on CPU a forked worker ends up holding its
    # own copy of every weight page the rank writes after the fork).
    jobs = [{"argv": argv + ["--use-distributed-optimizer"]}, {"argv": argv + ["--tp", "3", "--pp", "2"]}]
    return argv, run_distributed("tests.scenarios.training:runs", 6, timeout_s=1200, jobs=jobs)


def test_iteration_one_and_validation_equal_transformers_on_smollm2(smollm2_runs):
    argv, results = smollm2_runs
    train, valid = datasets_of(argv, world_size=6)
    first_batch = hf_reference(smollm2.smollm2_dir(), [train[i] for i in range(6)], grad_norm=True)
    validation = hf_reference(smollm2.smollm2_dir(), [valid[i] for i in range(len(valid))])
    assert 15 <= len(valid) <= 18  # 10% of 167 records: the last of 3 global batches is partly padding
    for job, layout in enumerate(("tp1pp1 dp6, distributed optimizer", "tp3pp2")):
        result = last_stage(results, job)
        (line,) = result["train_log"]
        assert line["lm loss tokens"] == first_batch["lm loss"]["count"], layout
        assert line["lm loss"] == pytest.approx(first_batch["lm loss"]["loss"], rel=1e-5), layout
        assert line["prompt nll"] == pytest.approx(first_batch["prompt nll"]["loss"], rel=1e-5), layout
        # The norm Megatron clips by: every TP shard counted once (it missed the shards of TP ranks > 0 when
        # the model was built without megatron-core's initialization, which also sets the TP attributes).
        assert line["grad-norm"] == pytest.approx(first_batch["grad norm"], rel=1e-4), layout
        (evaluated,) = result["valid_log"]
        for key in ("lm loss", "prompt nll", "response nll"):
            assert evaluated[key] == pytest.approx(validation[key]["loss"], rel=1e-5), (layout, key)


# ---- resume, resharding, epochs, SIGTERM, overfit: a tiny model on real HumanEval tokens --------------


@pytest.fixture(scope="module")
def tiny_runs(training_data):
    tmp = training_data["tmp"]
    common = ["--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
              "--log-interval", "1", "--data-cache-path", str(tmp / "cache"), "--lambda-prompt", "0.2", "--lambda-response", "0.8"]
    a = common + ["--data-path", training_data["he"], "--train-iters", "6", "--seq-length", "256"]  # packed, plain optimizer
    b = common + ["--data-path", training_data["he24"], "--no-packing", "--use-distributed-optimizer", "--train-epochs", "2"]
    load_tiny = ["--load", str(training_data["tiny"])]
    bf16 = ["--tp", "2", "--bf16", "--train-iters", "3", "--seq-length", "64"]
    save_a, save_b = tmp / "run-a", tmp / "run-b"
    jobs = [
        {"argv": load_tiny + a + ["--tp", "2", "--pp", "2", "--vpp", "2"], "params": True},  # 0: A uninterrupted
        {"argv": load_tiny + a + ["--tp", "2", "--pp", "2", "--vpp", "2", "--save", str(save_a), "--exit-interval", "3"]},
        {"argv": ["--load", str(save_a)] + a + ["--tp", "2", "--pp", "2", "--vpp", "2"], "params": True},  # 2: A resumed
        {"argv": load_tiny + b + ["--tp", "2"], "params": True},  # 3: B uninterrupted (3 iterations per epoch)
        {"argv": load_tiny + b + ["--tp", "2", "--save", str(save_b)], "sigterm_after": 2},  # 4: stopped by SIGTERM
        {"argv": ["--load", str(save_b)] + b + ["--tp", "2", "--save", str(save_b), "--save-hf", str(tmp / "b-hf")],
         "params": True, "logits_of": torch.tensor([[1, 504, 2909, 28, 7, 9, 5500, 11]])},  # 5: B resumed, exported
        {"argv": ["--load", str(save_a)] + a + ["--tp", "2"]},  # 6: A resumed at tp2 dp2
        {"argv": ["--load", str(save_a)] + a + ["--tp", "2", "--pp", "2"]},  # 7: A resumed at tp2pp2 without VPP
        {"argv": ["--load", str(save_a)] + a},  # 8: A resumed at dp4: the same data order
        {"argv": ["--load", str(save_b / "iter_0000002")] + b + ["--pp", "2"]},  # 9: B from iteration 2 at tp1pp2 dp2
        {"argv": load_tiny + common + ["--data-path", training_data["he24"], "--no-packing", "--train-epochs", "10",
                                       "--lr", "3e-3", "--lr-warmup-iters", "0", "--log-interval", "1"]},  # 10: overfit, dp4
        {"argv": ["--train-iters", "5", "--global-batch-size", "4", "--seq-length", "32", "--exit-duration-in-mins", "1e-9"]},
        {"argv": load_tiny + a + ["--tp", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                  "--overlap-param-gather"]},  # 12: A from the start, overlapped communication
        # Half-precision matmuls are slow on this CPU (bf16: 12x fp32's iteration time): short sequences, few iterations.
        {"argv": load_tiny + a + bf16, "params": True},  # 13: A in bf16 (fp32 main params)
        {"argv": load_tiny + a + bf16 + ["--save", str(tmp / "run-bf16"), "--exit-interval", "2"]},
        {"argv": ["--load", str(tmp / "run-bf16")] + a + bf16, "params": True},  # 15: resumed
        {"argv": load_tiny + a + ["--tp", "2", "--fp16", "--initial-loss-scale", "16384", "--hysteresis", "1",
                                  "--train-iters", "6", "--seq-length", "64"]},  # 16: fp16, a loss scale that overflows at first
    ]
    results = run_distributed("tests.scenarios.training:runs", 4, timeout_s=1500, jobs=jobs)
    return {"results": results, "save_a": save_a, "save_b": save_b, "argv_a": load_tiny + a + ["--tp", "2", "--pp", "2"],
            "a": a, "jobs": jobs}


def test_iteration_one_of_a_tiny_model_at_tp2pp2_with_vpp_equals_transformers(training_data, tiny_runs):
    train, _ = datasets_of(tiny_runs["argv_a"], world_size=4)
    reference = hf_reference(training_data["tiny_hf"], [train[i] for i in range(8)], grad_norm=True)
    assert max(int(train[i]["document_ids"].max()) for i in range(8)) >= 1  # packed: several records per sample
    first = last_stage(tiny_runs["results"], 0)["train_log"][0]
    assert first["lm loss tokens"] == reference["lm loss"]["count"]
    assert first["lm loss"] == pytest.approx(reference["lm loss"]["loss"], rel=1e-5)
    assert first["grad-norm"] == pytest.approx(reference["grad norm"], rel=1e-4)


def _assert_same_params(results: list[list[dict]], job: int, other: int) -> None:
    for rank in results:
        a, b = rank[job]["params"], rank[other]["params"]
        assert a.keys() == b.keys()
        different = [name for name in a if not torch.equal(a[name], b[name])]
        assert not different, different


def test_a_run_stopped_and_resumed_is_bitwise_the_uninterrupted_run(tiny_runs):
    results = tiny_runs["results"]
    # A: packed, plain optimizer, tp2pp2 with VPP, stopped by --exit-interval after iteration 3.
    full, stopped, resumed = (last_stage(results, j) for j in (0, 1, 2))
    assert stopped["exit_reason"] == "exit-interval" and stopped["iteration"] == 3 and stopped["exit_code"] == 0
    assert (tiny_runs["save_a"] / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert [line["iteration"] for line in resumed["train_log"]] == [4, 5, 6]
    assert logged(stopped) == logged(full)[:3] and logged(resumed) == logged(full)[3:]
    _assert_same_params(results, 0, 2)
    # B: unpacked, distributed optimizer, 2 epochs of 24 records = 6 iterations, SIGTERM during iteration 2.
    full, stopped, resumed = (last_stage(results, j) for j in (3, 4, 5))
    assert full["iteration"] == 6 and full["consumed"] == 48
    assert stopped["exit_reason"] == "signal" and stopped["iteration"] == 2 and stopped["exit_code"] == 143
    assert logged(stopped) == logged(full)[:2] and logged(resumed) == logged(full)[2:]
    assert logged(resumed, "lm loss tokens") == logged(full, "lm loss tokens")[2:]
    _assert_same_params(results, 3, 5)


def test_every_epoch_sees_every_record_once(training_data, tiny_runs):
    """B's 2 epochs: 48 samples = the 24 records twice, in two different orders."""
    argv = tiny_runs["jobs"][3]["argv"]
    train, _ = datasets_of(argv, world_size=4)
    firsts = [tuple(train[i]["tokens"][:20].tolist()) for i in range(48)]
    assert len(set(firsts[:24])) == 24 and set(firsts[:24]) == set(firsts[24:]) and firsts[:24] != firsts[24:]


def test_a_resume_at_another_layout_continues_the_uninterrupted_losses(tiny_runs):
    results = tiny_runs["results"]
    expected_a = logged(last_stage(results, 0))[3:]
    for job, layout in ((6, "tp2 dp2"), (7, "tp2pp2"), (8, "tp1pp1 dp4")):
        losses = logged(last_stage(results, job))
        assert losses == pytest.approx(expected_a, rel=1e-6), layout
    assert logged(last_stage(results, 9)) == pytest.approx(logged(last_stage(results, 3))[2:], rel=1e-6)  # distributed optimizer


def test_overlapped_gradient_and_parameter_communication_changes_nothing(tiny_runs):
    """Run A at tp2 dp2 with the distributed optimizer, bucketed gradient reduction during the backward
    pass and parameter gathering during the next forward pass: A's losses (tp2pp2 with VPP, plain)."""
    results = tiny_runs["results"]
    assert logged(last_stage(results, 12)) == pytest.approx(logged(last_stage(results, 0)), rel=1e-5)


def test_mixed_precision_as_megatron_does_it(training_data, tiny_runs):
    """bf16: iteration 1 within bf16 rounding of transformers' fp32 loss, and a bf16 run (bf16 weights, fp32
    main params in the optimizer) resumes bitwise; fp16: the dynamic loss scale skips the overflowing
    steps, halving the scale each time, and the run then trains with finite losses."""
    results = tiny_runs["results"]
    bf16, resumed = (last_stage(results, j) for j in (13, 15))
    train, _ = datasets_of(tiny_runs["jobs"][13]["argv"], world_size=4)
    fp32 = hf_reference(training_data["tiny_hf"], [train[i] for i in range(8)])["lm loss"]
    first = bf16["train_log"][0]
    assert first["lm loss tokens"] == fp32["count"]
    assert first["lm loss"] == pytest.approx(fp32["loss"], rel=2e-2) and first["lm loss"] != pytest.approx(fp32["loss"], rel=1e-5)
    assert logged(resumed) == logged(bf16)[2:]
    _assert_same_params(results, 13, 15)
    assert next(iter(results[0][13]["params"].values())).dtype == torch.bfloat16
    fp16 = last_stage(results, 16)["train_log"]
    skipped = [line["skipped iterations"] for line in fp16]
    first_step = skipped.index(0)  # the fp16 gradients of Σ w·NLL overflow at 16384: skipped, scale halved
    assert 1 <= first_step < 6 and not any(skipped[first_step:]), skipped
    assert [line["loss-scale"] for line in fp16[:first_step]] == [16384 / 2 ** (k + 1) for k in range(first_step)]
    assert all(line["loss-scale"] == fp16[first_step]["loss-scale"] for line in fp16[first_step:])
    assert all(math.isfinite(line["lm loss"]) for line in fp16)


def test_the_final_save_exports_to_hf_with_the_trained_logits(training_data, tiny_runs):
    from transformers import AutoModelForCausalLM

    exported = training_data["tmp"] / "b-hf"
    assert (exported / "tokenizer.json").exists() and (exported / "config.json").exists()
    tokens = tiny_runs["jobs"][5]["logits_of"]
    megatron = next(rank[5]["logits"] for rank in tiny_runs["results"] if rank[5]["logits"] is not None)
    hf = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)(tokens).logits
    assert (hf - megatron).abs().max() < 1e-4


def test_the_loss_falls_on_a_small_overfit_run(tiny_runs):
    """10 epochs over 24 HumanEval records: the response NLL and the WIT loss fall by over a third."""
    run = last_stage(tiny_runs["results"], 10)
    losses, nll = logged(run), logged(run, "response nll")
    assert len(losses) == 30  # 10 epochs of 24 records, 8 a step
    assert nll[-1] < 0.6 * nll[0] and losses[-1] < 0.65 * losses[0], (nll, losses)


def test_exit_duration_stops_after_the_first_iteration(tiny_runs):
    stopped = last_stage(tiny_runs["results"], 11)
    assert stopped["exit_reason"] == "duration" and stopped["iteration"] == 1 and stopped["exit_code"] == 0


# ---- Gemma-2: soft-capping, sliding windows inside packed records, tied scaled embeddings --------------


@pytest.fixture(scope="module")
def gemma_run(training_data):
    """A tiny random Gemma-2 with SmolLM2's vocabulary (a real Gemma tokenizer is not available offline),
    windows of 32 tokens inside packed HumanEval records of ~100-200, caps that bite; converted, then
    fine-tuned by pretrain_wit.py at tp2pp2 for 3 iterations, saved and exported to HF; the same run again
    with the chunked output layer."""
    import transformers

    tmp = training_data["tmp"] / "gemma"
    config = transformers.Gemma2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                                       max_position_embeddings=512, sliding_window=32, attn_logit_softcapping=5.0,
                                       final_logit_softcapping=3.0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, seed=11)
    hf = tmp / "hf"
    model.save_pretrained(hf)
    smollm2.load_tokenizer().save_pretrained(hf)
    argv = ["--load", str(convert(hf, tmp / "megatron")), "--data-path", training_data["he"], "--seq-length", "256",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3", "--log-interval", "1",
            "--lambda-prompt", "0.2", "--lambda-response", "0.8", "--data-cache-path", str(training_data["tmp"] / "cache"),
            "--tp", "2", "--pp", "2"]
    saves = ["--save", str(tmp / "trained"), "--save-hf", str(tmp / "trained-hf")]
    tokens = torch.tensor([[1, 504, 2909, 28, 7, 9, 5500, 11, 42, 17, 3, 990] * 4])  # 48 tokens: past the window
    jobs = [{"argv": argv + saves, "logits_of": tokens},
            {"argv": argv + ["--wit-loss-impl", "chunked", "--wit-loss-chunk-size", "16"]}]  # soft-capped in chunks
    results = run_distributed("tests.scenarios.training:runs", 4, timeout_s=1200, jobs=jobs)
    return {"hf": hf, "argv": argv, "tokens": tokens, "results": results, "exported": tmp / "trained-hf"}


def test_gemma2_iteration_one_equals_transformers_and_the_trained_model_exports(gemma_run):
    train, _ = datasets_of(gemma_run["argv"], world_size=4)
    reference = hf_reference(gemma_run["hf"], [train[i] for i in range(8)])
    assert max(int(train[i]["document_ids"].max()) for i in range(8)) >= 1  # packed: several records per sample
    run = last_stage(gemma_run["results"], 0)
    first = run["train_log"][0]
    assert first["lm loss tokens"] == reference["lm loss"]["count"]
    assert first["lm loss"] == pytest.approx(reference["lm loss"]["loss"], rel=1e-5)
    assert first["prompt nll"] == pytest.approx(reference["prompt nll"]["loss"], rel=1e-5)
    assert run["iteration"] == 3 and run["exit_reason"] == "finished"

    from transformers import AutoModelForCausalLM

    trained = next(rank[0]["logits"] for rank in gemma_run["results"] if rank[0]["logits"] is not None)
    exported = AutoModelForCausalLM.from_pretrained(str(gemma_run["exported"]), dtype=torch.float32)
    assert exported.config.architectures == ["Gemma2ForCausalLM"] and exported.config.final_logit_softcapping == 3.0
    assert (exported(gemma_run["tokens"]).logits - trained).abs().max() < 1e-4
    before = AutoModelForCausalLM.from_pretrained(str(gemma_run["hf"]), dtype=torch.float32)
    assert (before(gemma_run["tokens"]).logits - trained).abs().max() > 1e-2  # the weights did change


def test_the_chunked_output_layer_soft_caps_as_the_model_does(gemma_run):
    """`--wit-loss-impl chunked` computes its own logits: with Gemma-2's final soft-capping (and its
    derivative) at tp2pp2 in chunks of 16 tokens (recomputed in the backward pass), its three iterations
    log the unfused run's losses to 1e-6 and grad norms to 1e-5, so the updates were the same too."""
    unfused, chunked = (last_stage(gemma_run["results"], job)["train_log"] for job in (0, 1))
    assert [line["iteration"] for line in chunked] == [1, 2, 3]
    for u, c in zip(unfused, chunked):
        assert c["lm loss tokens"] == u["lm loss tokens"] > 0
        for key in ("lm loss", "prompt nll", "response nll"):
            assert c[key] == pytest.approx(u[key], rel=1e-6), (u["iteration"], key)
        assert c["grad-norm"] == pytest.approx(u["grad-norm"], rel=1e-5), u["iteration"]


# ---- two torchrun agents as two nodes ------------------------------------------------------------------


# Megatron-LM's training_log fields and order, then WIT's: the line tools that parse Megatron-LM logs read.
MEGATRON_LM_LOG_LINE = re.compile(
    r"^ iteration +\d+/ +\d+ \| consumed samples: +\d+ \| elapsed time per iteration \(ms\): [\d.]+ \| "
    r"learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +\d+ \| lm loss: \d\.\d{6}E[+-]\d\d \| "
    r"prompt nll: [\d.E+-]+ \| response nll: [\d.E+-]+ \| loss scale: [\d.]+ \| grad norm: [\d.]+ \| "
    r"tokens per second: [\d.]+ \| number of skipped iterations: +\d+ \| number of nan iterations: +\d+ \| "
    r"prompt tokens: \d+ \| response tokens: \d+ \| N: \d+ \|$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_as_two_nodes_give_the_single_launch_losses(training_data, tiny_runs, tmp_path):
    """`--nnodes 2` with a c10d rendezvous on this machine, 2 processes per agent, resuming run A at tp2 dp2
    and at tp2pp2: the losses of the same layouts launched as one 4-rank job, bitwise; TensorBoard holds
    the logged values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job, layout in ((6, ["--tp", "2"]), (7, ["--tp", "2", "--pp", "2"])):
        port = _free_port()
        tb = tmp_path / f"tb{job}"
        argv = ["--load", str(tiny_runs["save_a"])] + tiny_runs["a"] + layout + ["--tensorboard-dir", str(tb)]
        agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"wit{job}",
             "examples/pretrain_wit.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for node in (0, 1)]
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
        assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        assert "layer spec: local" in "".join(outputs)  # what the converter recorded (--layer-spec local)
        # Which kernels run, said once, instead of megatron-core's import-time "not installed" warnings.
        assert "kernels: torch's norms, Adam and multi-tensor ops" in "".join(outputs)
        assert not re.search("(is|are) not installed", "".join(outputs)), outputs[0][-3000:]
        lines = [line for o in outputs for line in o.splitlines() if line.startswith(" iteration ")]
        assert all(MEGATRON_LM_LOG_LINE.match(line) for line in lines) and len(lines) == 3, lines
        losses = [float(x) for o in outputs for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", o)]
        expected = logged(last_stage(tiny_runs["results"], job))
        assert losses == [float(f"{x:.6E}") for x in expected], (losses, expected)
        events = EventAccumulator(str(tb)).Reload()
        scalars = [e.value for e in events.Scalars("lm loss")]
        assert scalars == pytest.approx(expected, rel=1e-6)
        assert [e.step for e in events.Scalars("lm loss")] == [4, 5, 6]


# ---- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, world, message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "not a multiple of --micro-batch-size 4"),
    (["--tp", "3"], 4, "world size 4 is not divisible by tp*pp*cp"),
    (["--tp", "3", "--num-attention-heads", "8"], 3, "does not divide the 8 attention heads"),
    (["--lambda-prompt", "-1"], 1, "λ for role 'prompt' must be finite and >= 0"),
    (["--lambda-response", "nan"], 1, "λ for role 'response' must be finite and >= 0"),
    (["--lambda-prompt", "0", "--lambda-response", "0"], 1, "every λ is 0"),
    (["--train-iters", "0"], 1, "--train-iters must be >= 1"),
    (["--train-iters", "2", "--lr-warmup-iters", "2"], 1, "--lr-warmup-iters 2 must be below the decay iterations"),
    (["--vpp", "2"], 1, "a virtual pipeline (--vpp) needs --pp >= 2"),
    (["--bf16", "--fp16"], 1, "not allowed with argument"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--cp", "2"], 2, "needs GPUs"),
    (["--micro-batch-size", "0"], 1, "--micro-batch-size must be >= 1"),
    (["--split", "90,x"], 1, "--split '90,x'"),
])
def test_bad_options_are_refused_before_any_process_group(argv, world, message, capsys):
    from wit_megatron.training.arguments import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, world_size=world)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_checkpoint_and_data_options_are_checked_against_the_files(training_data, tmp_path, capsys):
    from wit_megatron.training.arguments import parse_args

    tiny, he, he24 = str(training_data["tiny"]), training_data["he"], training_data["he24"]
    cases = [
        (["--load", str(tmp_path)], "not a Megatron checkpoint"),
        (["--load", tiny, "--data-path", str(tmp_path / "none")], "is not a dataset written by wit-preprocess-data"),
        (["--load", tiny, "--data-path", he, "--num-layers", "2"], "the architecture comes from --load"),
        (["--load", tiny], "--load of a converted model needs --data-path"),
        (["--load", tiny, "--data-path", "1", he, "2", he24, "--train-epochs", "1"], "a weighted blend defines a sampling mix"),
        (["--load", tiny, "--data-path", he, "--tp", "3"], "valid sizes"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv, world_size=3 if "--tp" in argv else 1)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    assert not torch.distributed.is_initialized()


def test_help_states_the_paper_defaults():
    out = subprocess.run([sys.executable, "examples/pretrain_wit.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for fragment in ("--tensor-model-parallel-size", "--lr LR (default: 2e-05)", "--lr-decay-style", "(default: cosine)",
                     "--weight-decay WEIGHT_DECAY (default: 0.1)", "default 0.01", "--global-batch-size GLOBAL_BATCH_SIZE",
                     "default: 1 when neither this nor --train-iters", "--finetune", "--exit-interval"):
        assert fragment in text, fragment


def test_recorded_layer_spec_decides_what_training_builds(monkeypatch):
    """"local" is always honoured; "te" (and no record) means TE's spec only where TE can run."""
    from wit_megatron import model

    for te_present, expected in ((True, {"te": "te", None: "te", "local": "local"}),
                                 (False, {"te": "local", None: "local", "local": "local"})):
        monkeypatch.setattr(model, "transformer_engine_available", lambda: te_present)
        assert {k: model.preferred_layer_spec(k) for k in expected} == expected
