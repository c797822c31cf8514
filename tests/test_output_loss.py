"""The chunked WIT output layer (`--wit-loss-impl chunked`) gives Megatron's unfused loss and every
gradient: at tp1 (dp4), tp2, tp4 and pp2, tied and untied embeddings, λ ∈ {(0,1), (0.2,0.8), (1,1)},
packed and unpacked sequences, with a micro-batch (and a whole global batch) of zero weights; under
sequence parallelism against megatron-core's own ColumnParallelLinear; through the training command line.
One 4-rank launch.

Shown failing once: without the TP all-reduce of the input gradient (output_loss.output_layer_nll)
the tp2 gradients are off by 0.97 (relative)."""

import math

import pytest
import torch

from wit_megatron.layers.softcap import final_logit_softcap
from wit_megatron.output_loss import OutputLoss, vocab_parallel_nll
from wit_megatron.runtime.launch import run_distributed

RTOL = 1e-6  # fp32: loss and every gradient (relative to the tensor's largest entry)
LAMBDAS = [(0.0, 1.0), (0.2, 0.8), (1.0, 1.0)]


def batch(lambdas, packed=False, **extra):
    return {"num_seqs": 8, "lambdas": lambdas, "seed": 21 + packed, "packed": packed,
            "validate": lambdas[0] == 0.0, **extra}


# λ_p = 0 and sequences 0-1 without response: the first micro-batch (at dp4 rank 0's whole share) has no weight.
ZERO_MICRO_BATCH = batch((0.0, 1.0), seed=23, prompt_only=[0, 1], validate=False)
ZERO_GLOBAL_BATCH = batch((0.0, 1.0), seed=24, prompt_only=list(range(8)), validate=False)  # no weight anywhere
# Every layout runs every λ untied on unpacked and tied on packed sequences (and the zero-weight batches);
# untied in chunks of 7 tokens (several per micro-batch, logits recomputed in the backward pass), tied in
# one chunk (its softmax kept for the backward pass).
MODELS = [
    {"layout": layout, "tied": tied, "batches": [batch(lam, packed=tied) for lam in LAMBDAS] + zero,
     "chunk_size": 1024 if tied else 7}
    for layout in [(1, 1), (2, 1), (4, 1), (1, 2)]  # on 4 ranks: tp1 dp4, tp2 dp2, tp4, pp2 dp2
    for tied, zero in ((False, [ZERO_MICRO_BATCH]), (True, [ZERO_GLOBAL_BATCH] if layout == (1, 2) else []))
]


# The command line: the same tiny synthetic run with each implementation, at pp2 dp2, λ_p = 0.
TRAINING = ["--train-iters", "2", "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "32", "--pp", "2",
            "--lambda-prompt", "0", "--lambda-response", "1", "--log-interval", "1", "--lr", "1e-3"]
TRAINING_JOBS = [{"argv": TRAINING}, {"argv": TRAINING + ["--wit-loss-impl", "chunked", "--wit-loss-chunk-size", "5"]}]


@pytest.fixture(scope="module")
def results():
    return run_distributed("tests.scenarios.output_loss:run", 4, models=MODELS, micro_batch_size=2,
                           sequence_parallel=[2, 4], training_jobs=TRAINING_JOBS)


def _cases(results):
    """(label, [per-rank case dicts]) for every layout × tied × batch."""
    per_rank = [r["layouts"] for r in results]
    for i, case in enumerate(per_rank[0]):
        b = case["batch"]
        label = f"{case['layout']} tied={case['tied']} λ={b['lambdas']} packed={b.get('packed', False)} " \
                f"prompt_only={b.get('prompt_only', [])}"
        yield label, [cases[i] for cases in per_rank]


def test_loss_and_every_gradient_equal_the_unfused_path(results):
    checked = 0
    for label, ranks in _cases(results):
        reports = [r for r in ranks if r["unfused"]]  # ranks of the last pipeline stage
        assert reports, label
        for r in reports:
            unfused, chunked = r["unfused"], r["chunked"]
            assert chunked["lm loss tokens"] == unfused["lm loss tokens"], label
            assert math.isfinite(chunked["lm loss"]), label
            assert chunked["lm loss"] == pytest.approx(unfused["lm loss"], rel=RTOL, abs=1e-12), label
            assert chunked["response nll"] == pytest.approx(unfused["response nll"], rel=RTOL), label
        for r in ranks:
            if r["grads"] is None:
                continue
            for name, (diff, scale) in r["grads"].items():
                assert math.isfinite(diff), f"{label}: {name} gradient is not finite"
                assert diff <= RTOL * scale, f"{label}: {name} gradient off by {diff / max(scale, 1e-30):.2e} (relative)"
                checked += 1
    assert checked > 1000


def test_all_zero_weights_contribute_nothing(results):
    for label, ranks in _cases(results):
        if len(ranks[0]["batch"].get("prompt_only", [])) != 8:
            continue
        for r in ranks:
            if r["chunked"]:
                assert r["chunked"]["lm loss"] == 0.0 and r["chunked"]["lm loss tokens"] == 0, label
            if r["grads"] is not None:  # equal to the unfused path's, which are all zero
                assert all(diff == 0.0 and scale == 0.0 for diff, scale in r["grads"].values()), label


def test_prompt_report_covers_the_computed_targets(results):
    """Training computes only weighted targets (at λ_p = 0 no prompt target); validation computes all."""
    for label, ranks in _cases(results):
        lambda_p = ranks[0]["batch"]["lambdas"][0]
        for r in (r for r in ranks if r["unfused"]):
            unfused, chunked = r["unfused"], r["chunked"]
            assert unfused["prompt nll tokens"] > 0, label
            if lambda_p == 0:
                assert chunked["prompt nll tokens"] == 0, label
            else:
                assert chunked["prompt nll"] == pytest.approx(unfused["prompt nll"], rel=RTOL), label
                assert chunked["prompt nll tokens"] == unfused["prompt nll tokens"], label
            if not r["batch"]["validate"]:
                continue
            valid_unfused, valid_chunked = r["unfused valid"], r["chunked valid"]
            for key in ("lm loss", "prompt nll", "response nll"):
                assert valid_chunked[key + " tokens"] == valid_unfused[key + " tokens"], (label, key)
                assert valid_chunked[key] == pytest.approx(valid_unfused[key], rel=RTOL, abs=1e-12), (label, key)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_against_megatron_column_parallel_linear(results, tp):
    for rank, r in enumerate(results):
        sp = r["sequence parallel"][tp]
        for key in ("nll", "hidden grad", "weight grad"):
            expected, got = sp["unfused"][key], sp["chunked"][key]
            assert expected.abs().max() > 0, (tp, rank, key)
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item(),
                                       msg=f"tp{tp} rank {rank} {key}")


@pytest.mark.parametrize("softcap", [None, 3.0])  # 3.0: most logits (std 4) in tanh's bend
@pytest.mark.parametrize("chunk_size", [1, 4, 37, 100])
def test_chunks_against_log_softmax_in_float64(chunk_size, softcap):
    """One process: NLL and gradients of the chunked function against autograd through log_softmax (and
    through cap·tanh(logit / cap) with Gemma-2's final-logit soft-capping). Shown failing once: without
    the tanh derivative the soft-capped gradients are off by 1.3 (input) and 1.6 (weight) times their
    largest entry."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=gen)
    upstream = torch.rand(37, generator=gen)
    nll = vocab_parallel_nll(hidden, weight, labels, chunk_size, softcap=softcap)
    grads = torch.autograd.grad((nll * upstream).sum(), (hidden, weight))
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h @ w.t() if softcap is None else softcap * torch.tanh(h @ w.t() / softcap)
    expected = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), (h, w))
    torch.testing.assert_close(nll.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_no_targets_gives_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    nll = vocab_parallel_nll(hidden, weight, torch.zeros(0, dtype=torch.long), 4)
    nll.sum().backward()
    assert nll.shape == (0,) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="choose one of unfused, chunked"):
        OutputLoss("fused")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        OutputLoss("chunked", 0)
    with pytest.raises(TypeError, match="needs one dtype"):
        vocab_parallel_nll(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long), 2)


@pytest.mark.parametrize("softcap", [None, 1.0])
@pytest.mark.parametrize("chunk_size", [8, 64])  # 9 vocabulary blocks; one chunk (its softmax kept)
def test_bf16_as_accurate_as_the_unfused_form(chunk_size, softcap):
    """bf16 (the vocabulary-block backward pass): NLL and gradients no further from float64 than the unfused
    form (bf16 logits, float32 cross entropy, bf16 matmul gradients). Shown failing once: summing the input
    gradient over the 9 blocks in bf16 instead of float32 gives 5.7e-3 against the unfused form's 2.6e-3."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(300, 32, generator=gen)).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (64,), generator=gen)
    upstream = torch.rand(64, generator=gen)

    def nll_and_grads(fn, h, w):
        nll = fn(h, w)
        return nll.double(), [g.double() for g in torch.autograd.grad((nll * upstream.to(nll.dtype)).sum(), (h, w))]

    def unfused(h, w):  # the model's output layer (soft-capped as ExtendedGPTModel's) and cross entropy
        logits = final_logit_softcap(torch.nn.functional.linear(h, w), softcap)
        return -torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)

    exact = nll_and_grads(unfused, hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    megatron = nll_and_grads(unfused, hidden, weight)
    chunked = nll_and_grads(lambda h, w: vocab_parallel_nll(h, w, labels, chunk_size, softcap=softcap), hidden, weight)
    errors = [[(got - want).abs().max().item() for got, want in zip([r[0], *r[1]], [exact[0], *exact[1]])]
              for r in (megatron, chunked)]
    for name, bf16, ours in zip(("nll", "hidden grad", "weight grad"), *errors):
        assert ours <= 2 * bf16 + 1e-6, f"{name}: chunked error {ours:.2e} vs unfused bf16 error {bf16:.2e}"


def test_the_training_command_line_selects_the_output_layer(results):
    """`--wit-loss-impl chunked` trains as unfused does; its log lines leave out the prompt NLL at λ_p = 0."""
    last = results[-1]["training"]  # the last rank logs (a rank of the last pipeline stage)
    unfused, chunked = (last[job]["train_log"] for job in (0, 1))
    assert len(unfused) == len(chunked) == 2
    for u, c in zip(unfused, chunked):
        assert c["lm loss tokens"] == u["lm loss tokens"] > 0
        assert c["lm loss"] == pytest.approx(u["lm loss"], rel=1e-5)
        assert c["response nll"] == pytest.approx(u["response nll"], rel=1e-5)
        assert u["prompt tokens"] > 0 and u["prompt nll"] is not None
        assert c["prompt tokens"] == 0 and c["prompt nll"] is None


@pytest.mark.parametrize("argv, message", [
    (["--wit-loss-impl", "fused"], "invalid choice: 'fused'"),
    (["--wit-loss-chunk-size", "0"], "--wit-loss-chunk-size must be >= 1"),
])
def test_bad_loss_options_are_refused(argv, message, capsys):
    from wit_megatron.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv, world_size=1)
    assert message in capsys.readouterr().err
