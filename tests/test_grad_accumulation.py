"""Gradient accumulation is exact (no mean of per-micro-batch means) and empty micro-batches are harmless."""

import math

import pytest
import torch

from tests.test_parity_layouts import check_against_reference, merged_grads
from wit_megatron.runtime.launch import run_distributed

# Four sequences with very different numbers of targets: 32, 2, 19 and 7.
UNEVEN = {"num_seqs": 4, "lambdas": (0.2, 0.8), "seed": 5, "lengths": [33, 3, 20, 8]}
# λ_p = 0 and sequence 0 has no response token: its micro-batch has no non-zero-weight target.
EMPTY_FIRST = {"num_seqs": 4, "lambdas": (0.0, 1.0), "seed": 6, "prompt_only": [0]}
# No non-zero-weight target in the whole global batch.
EMPTY_ALL = {"num_seqs": 4, "lambdas": (0.0, 1.0), "seed": 6, "prompt_only": [0, 1, 2, 3]}


@pytest.fixture(scope="module")
def results():
    cases = [
        {"layout": (1, 1), "mbs": 1, "batch": UNEVEN},
        {"layout": (1, 1), "mbs": 4, "batch": UNEVEN},
        {"layout": (1, 1), "mbs": 1, "batch": EMPTY_FIRST},
        {"layout": (1, 1), "mbs": 1, "batch": EMPTY_ALL},
    ]
    out = run_distributed("tests.scenarios.parity:run", 1, cases=cases, references=[UNEVEN, EMPTY_FIRST])
    return cases, out


def test_four_uneven_micro_batches_equal_one_big_batch(results):
    cases, out = results
    check_against_reference(out, cases, [UNEVEN, EMPTY_FIRST], only=(0, 1))
    accumulated, whole = (out[0]["cases"][i] for i in (0, 1))
    assert accumulated["report"]["lm loss"] == pytest.approx(whole["report"]["lm loss"], rel=1e-6)
    for name, g in accumulated["grads"].items():
        torch.testing.assert_close(g, whole["grads"][name], rtol=1e-5, atol=1e-7)

    # The check can tell the bug apart: a mean of per-micro-batch means is far from the true loss.
    ref = out[0]["references"][0]
    per_seq = [(ref["weights"][i] * ref["nll"][i]).sum() / (ref["weights"][i] != 0).sum() for i in range(4)]
    mean_of_means = float(sum(per_seq) / 4)
    assert abs(mean_of_means - ref["loss"]) / ref["loss"] > 0.01


def test_micro_batch_without_weighted_tokens(results):
    cases, out = results
    first_report = out[0]["cases"][2]["report"]
    assert math.isfinite(first_report["lm loss"])
    check_against_reference(out, cases, [UNEVEN, EMPTY_FIRST], only=(2,))


def test_global_batch_without_weighted_tokens_gives_zero_not_nan(results):
    _, out = results
    case = out[0]["cases"][3]
    assert case["report"]["lm loss"] == 0.0 and case["report"]["lm loss tokens"] == 0
    assert case["report"]["prompt nll tokens"] > 0 and math.isfinite(case["report"]["prompt nll"])
    grads = merged_grads(out, 3)
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
