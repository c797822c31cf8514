"""The WIT loss terms on one micro-batch, against the formula written out by hand."""

import math

import pytest
import torch

from wit_megatron.loss import megatron_lm_loss_func, reduce_reports, wit_loss
from wit_megatron.roles import Role, RoleWeights


def make(seed=0, b=3, s=11):
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(b, s, generator=g) * 5
    mask = (torch.rand(b, s, generator=g) > 0.2).float()
    response = torch.rand(b, s, generator=g) > 0.5
    weights = torch.where(response, 0.8, 0.2) * mask
    return nll, weights, mask, response


def hand_formula(nll, weights, mask=None):
    """(Σ w·NLL, N) over the targets inside `mask`, written out element by element."""
    total, count = 0.0, 0
    for i in range(nll.shape[0]):
        for j in range(nll.shape[1]):
            if (mask is None or mask[i, j]) and weights[i, j] != 0:
                total += float(weights[i, j]) * float(nll[i, j])
                count += 1
    return total, count


def weights_beyond_the_mask(seed):
    """make()'s batch with non-zero weights under a zero loss_mask too (padding a dataset forgot to
    zero), and a mask that differs from where the weights are non-zero."""
    nll, weights, mask, response = make(seed)
    beyond = weights + 0.6 * (mask == 0)
    assert bool((beyond[mask == 0] != 0).all()) and int((mask == 0).sum()) >= 3
    return nll, beyond, mask, response


def test_terms_match_hand_written_formula():
    nll, weights, mask, response = make()
    total, n, report = wit_loss(nll, weights, mask, response)
    expected_sum, expected_n = 0.0, 0
    prompt_sum = prompt_n = resp_sum = resp_n = 0
    for i in range(nll.shape[0]):
        for j in range(nll.shape[1]):
            if mask[i, j]:
                if weights[i, j] != 0:
                    expected_sum += float(weights[i, j]) * float(nll[i, j])
                    expected_n += 1
                if response[i, j]:
                    resp_sum, resp_n = resp_sum + float(nll[i, j]), resp_n + 1
                else:
                    prompt_sum, prompt_n = prompt_sum + float(nll[i, j]), prompt_n + 1
    assert n.dtype == torch.int32 and int(n) == expected_n
    assert float(total) == pytest.approx(expected_sum, rel=1e-6)
    assert report["lm loss"].tolist() == pytest.approx([expected_sum, expected_n], rel=1e-6)
    assert report["prompt nll"].tolist() == pytest.approx([prompt_sum, prompt_n], rel=1e-6)
    assert report["response nll"].tolist() == pytest.approx([resp_sum, resp_n], rel=1e-6)


def test_count_is_of_nonzero_weights_not_their_sum():
    nll = torch.ones(1, 4)
    weights = torch.tensor([[0.0, 0.5, 0.25, 0.25]])
    total, n, _ = wit_loss(nll, weights)
    assert int(n) == 3 and float(total) == pytest.approx(1.0)


def test_gradient_is_weighted_and_zero_elsewhere():
    nll, weights, mask, response = make(1)
    nll.requires_grad_(True)
    total, _, _ = wit_loss(nll, weights, mask, response)
    total.backward()
    torch.testing.assert_close(nll.grad, weights * mask, rtol=0, atol=0)


def test_non_finite_nll_at_zero_weight_does_not_leak():
    nll = torch.tensor([[1.0, float("inf"), float("nan")]])
    weights = torch.tensor([[0.5, 0.0, 0.0]])
    total, n, report = wit_loss(nll, weights, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[True, False, False]]))
    assert float(total) == 0.5 and int(n) == 1
    assert report["response nll"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "bad, message",
    [(float("nan"), "NaN, infinite or negative"), (float("inf"), "NaN, infinite or negative"), (-0.1, "NaN, infinite or negative")],
)
def test_bad_weights_are_rejected(bad, message):
    nll, weights, mask, response = make(2)
    weights[1, 3] = bad
    with pytest.raises(ValueError, match=message) as err:
        wit_loss(nll, weights, mask, response)
    assert "[1, 3]" in str(err.value)


def test_integer_weights_are_rejected():
    nll, weights, mask, response = make(3)
    with pytest.raises(TypeError, match="cast to an integer type"):
        wit_loss(nll, weights.long(), mask, response)


def test_misaligned_weights_are_rejected():
    nll, weights, mask, response = make(3)
    with pytest.raises(ValueError, match="aligned with the"):
        wit_loss(nll, weights[:, 1:], mask, response)


def test_role_weights_validation_and_table():
    table = RoleWeights(0.2, 0.8, tool=0.1).table()
    assert table.dtype == torch.float32
    assert table[Role.PROMPT] == pytest.approx(0.2) and table[Role.RESPONSE] == pytest.approx(0.8)
    assert table[Role.SYSTEM] == pytest.approx(0.2) and table[Role.USER] == pytest.approx(0.2)
    assert table[Role.TOOL] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="λ_p = λ_r = 0"):
        RoleWeights(0.0, 0.0)
    with pytest.raises(ValueError, match="role 'response'"):
        RoleWeights(0.0, -1.0)
    with pytest.raises(ValueError, match="role 'prompt'"):
        RoleWeights(float("nan"), 1.0)


def test_weights_outside_the_loss_mask_are_ignored():
    """Non-zero weights where loss_mask is 0 count neither in Σ w·NLL nor in N and get no gradient.
    Fails on a wit_loss without its masking line (`weights = weights * targets`): checked by
    deleting it, which gave N = 33 instead of 29 here (and 33 instead of 27 in the adapter test below)."""
    nll, weights, mask, response = weights_beyond_the_mask(5)
    nll.requires_grad_(True)
    total, n, report = wit_loss(nll, weights, mask, response)
    expected_sum, expected_n = hand_formula(nll.detach(), weights, mask)
    assert int(n) == expected_n and float(total) == pytest.approx(expected_sum, rel=1e-6)
    assert report["lm loss"].tolist() == pytest.approx([expected_sum, expected_n], rel=1e-6)
    total.backward()
    assert bool((nll.grad[mask == 0] == 0).all())
    torch.testing.assert_close(nll.grad, weights * mask, rtol=0, atol=0)


def test_megatron_lm_adapter_against_the_hand_formula():
    """Both ways of calling Megatron-LM's `loss_func` signature, against the hand formula: explicit
    weights with a loss_mask that differs from them (weights beyond the mask are ignored), and float
    weights in the loss-mask slot (every non-zero weight is a target)."""
    nll, weights, mask, response = weights_beyond_the_mask(4)
    total, n, report = megatron_lm_loss_func(mask, nll, None, loss_weights=weights, response_mask=response)
    expected_sum, expected_n = hand_formula(nll, weights, mask)
    assert int(n) == expected_n and float(total) == pytest.approx(expected_sum, rel=1e-6)
    assert set(report) == {"lm loss", "prompt nll", "response nll"}
    assert report["response nll"][1] == float((mask.bool() & response).sum())  # the mask, not the weights, picks targets

    total, n, report = megatron_lm_loss_func(weights, nll)
    expected_sum, expected_n = hand_formula(nll, weights)
    assert expected_n > int((weights * mask != 0).sum())  # the weights beyond the mask count here
    assert int(n) == expected_n and float(total) == pytest.approx(expected_sum, rel=1e-6)
    assert set(report) == {"lm loss"}


def test_reduce_reports_sums_pairs_then_divides():
    reports = [
        {"lm loss": torch.tensor([3.0, 2.0]), "prompt nll": torch.tensor([0.0, 0.0])},
        {"lm loss": torch.tensor([1.0, 6.0]), "prompt nll": torch.tensor([0.0, 0.0])},
    ]
    out = reduce_reports(reports)
    assert out["lm loss"] == pytest.approx(4.0 / 8.0)  # not the mean of 1.5 and 1/6
    assert out["lm loss tokens"] == 8 and out["lm loss sum"] == 4.0
    assert out["prompt nll"] == 0.0 and out["prompt nll tokens"] == 0
    assert math.isfinite(out["prompt nll"])


def test_per_token_nll_from_tensor_parallel_logits_equals_cross_entropy():
    from wit_megatron.runtime.launch import run_distributed

    results = run_distributed("tests.scenarios.plumbing:nll_from_sharded_logits", 2, tp=2)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 16, generator=gen) * 4
    labels = torch.randint(0, 16, (2, 5), generator=gen)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), labels.reshape(-1), reduction="none").reshape(2, 5)
    for nll in results:
        assert nll.shape == (2, 5)
        torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
