"""The WIT loss in Megatron-Core's per-token form.

Loss = Σ_t w_t · NLL_t / N, with N = the number of target tokens whose weight is non-zero, counted over
the whole global batch. Each micro-batch returns (Σ w·NLL, N, report); with
`TransformerConfig.calculate_per_token_loss=True` Megatron-Core sums both over micro-batches and over
data- and context-parallel ranks and scales gradients by 1/N_total in `finalize_model_grads`, which is
exactly the normalization above (no mean of per-micro-batch means).

The report holds [sum, count] pairs, so that it aggregates exactly across micro-batches and ranks:
    "lm loss"       [Σ w·NLL, N]            the WIT loss
    "prompt nll"    [Σ NLL, #prompt targets]   plain mean NLL of prompt targets (unweighted)
    "response nll"  [Σ NLL, #response targets] plain mean NLL of response targets (unweighted)
"""

from __future__ import annotations

from typing import Optional

import torch

REPORT_KEYS = ("lm loss", "prompt nll", "response nll")


def check_loss_weights(loss_weights: torch.Tensor) -> None:
    """Raise if `loss_weights` is not a float tensor of finite, non-negative values."""
    if not torch.is_floating_point(loss_weights):
        raise TypeError(
            f"loss_weights must be a floating-point tensor, got dtype {loss_weights.dtype}: "
            "per-token weights were cast to an integer type somewhere upstream"
        )
    bad = ~torch.isfinite(loss_weights) | (loss_weights < 0)
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        values = loss_weights[bad][:5].tolist()
        raise ValueError(
            f"loss_weights has {int(bad.sum())} NaN, infinite or negative value(s) "
            f"(first at positions {idx}: {values}); weights must be finite and >= 0"
        )


def wit_loss(
    per_token_nll: torch.Tensor,
    loss_weights: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    response_mask: Optional[torch.Tensor] = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's WIT loss terms.

    Args:
        per_token_nll: [b, s] NLL of each target (Megatron's vocab-parallel cross entropy output).
        loss_weights: [b, s] float weight of each target (λ of its role; 0 on padding).
        loss_mask: [b, s] 1 on real targets, 0 on padding. Weights outside it are ignored. It also
            defines the targets counted in the prompt/response NLL report.
        response_mask: [b, s] bool, True on response targets. Needed for the prompt/response report;
            without it those two entries are left out.
        check: validate `loss_weights` (one host sync).

    Returns:
        (Σ w·NLL as a float32 scalar, N as an int32 scalar, report of [sum, count] float32 pairs).
    """
    if check:
        check_loss_weights(loss_weights)
    if per_token_nll.shape != loss_weights.shape:
        raise ValueError(
            f"per_token_nll has shape {tuple(per_token_nll.shape)} but loss_weights has "
            f"{tuple(loss_weights.shape)}: weights must be aligned with the (shifted) labels"
        )
    nll = per_token_nll.float()
    weights = loss_weights.float()
    targets = torch.ones_like(weights, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    if loss_mask is not None:
        weights = weights * targets
    weighted = weights != 0
    # torch.where, not a product: a NaN/inf NLL at a zero-weight position must not leak into the sum.
    weighted_sum = torch.where(weighted, nll * weights, 0.0).sum()
    num_tokens = weighted.sum().to(torch.int32)

    report = {"lm loss": torch.stack([weighted_sum.detach(), num_tokens.float()])}
    if response_mask is not None:
        response = targets & response_mask.bool()
        prompt = targets & ~response_mask.bool()
        detached = nll.detach()
        for key, mask in (("prompt nll", prompt), ("response nll", response)):
            report[key] = torch.stack([torch.where(mask, detached, 0.0).sum(), mask.sum().float()])
    return weighted_sum, num_tokens, report


def megatron_lm_loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    model: Optional[torch.nn.Module] = None,
    *,
    loss_weights: Optional[torch.Tensor] = None,
    response_mask: Optional[torch.Tensor] = None,
):
    """Drop-in for Megatron-LM's `loss_func(loss_mask, output_tensor, model=None)`.

    Use it as `partial(megatron_lm_loss_func, loss_mask, loss_weights=w, response_mask=r)` in a
    `forward_step`. If `loss_weights` is not given, `loss_mask` itself is taken as the float per-token
    weights (a dataset that puts WIT weights in the loss-mask slot then works with an unchanged
    forward_step). Requires `--calculate-per-token-loss` for the global-batch normalization.
    """
    del model  # accepted for signature compatibility
    if loss_weights is None:
        return wit_loss(output_tensor, loss_mask, None, response_mask)
    return wit_loss(output_tensor, loss_weights, loss_mask, response_mask)


def per_token_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s] NLL from [b, s, vocab/tp] tensor-parallel logits (Megatron's vocab-parallel CE)."""
    from megatron.core import tensor_parallel

    # vocab_parallel_cross_entropy takes [s, b, v] and returns [s, b].
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(), labels.t().contiguous())
    return nll.t()


def reduce_reports(reports: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Sum [sum, count] pairs over micro-batches and over `group` (data- and context-parallel ranks).

    Returns key -> sum / count (0.0 where the count is 0: a global batch without targets of that
    kind), plus key + " tokens" -> count and key + " sum" -> sum (to aggregate further exactly).
    """
    totals: dict[str, torch.Tensor] = {}
    for report in reports:
        for key, pair in report.items():
            totals[key] = totals.get(key, 0) + pair.detach().double()
    keys = sorted(totals)
    if not keys:
        return {}
    stacked = torch.stack([totals[k] for k in keys])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(stacked, group=group)
    out: dict[str, float] = {}
    for key, (s, n) in zip(keys, stacked.tolist()):
        out[key] = s / n if n > 0 else 0.0
        out[key + " tokens"] = int(n)
        out[key + " sum"] = s
    return out
