"""A lean WIT output layer: the vocab-parallel output projection and cross entropy in token chunks, only
for the targets whose weight is non-zero.

Megatron's own path (`--wit-loss-impl unfused`) projects every position to [tokens × vocab/TP] logits,
keeps them (and their softmax) for the backward pass and then weights the per-token NLL. Under WIT,
targets of weight 0 (every prompt token at λ_p = 0, padding always) contribute nothing, so the chunked
path gathers them out before the output layer: they cost neither memory nor FLOPs. The rest goes
through `_ChunkedVocabParallelNLL` `chunk_size` tokens at a time: no more than one chunk's logits
(chunk_size x vocab/TP) exist at a time, in the forward pass and again, recomputed, in the backward pass
(float32 weights: token chunks again; bf16/fp16: blocks of the vocabulary of as many logits, see
`_backward_in_vocab_blocks`). When all targets fit in one chunk, its softmax is kept for the backward
pass instead (the same memory, one matmul less).

Numerics follow megatron-core's `vocab_parallel_cross_entropy` step by step, on one chunk at a time:
logits in the weight's dtype, then float32; the max over the TP group (all-reduce MAX), then the target
logit and Σ exp(logit - max) (one all-reduce SUM of both, of chunk-size floats); NLL = log Σ - (target
- max); softmax = exp(logit - max) / Σ in the backward pass, from the max and Σ kept per token. A model
with final-logit soft-capping (Gemma-2) has its logits capped by the model's own function
(`layers.softcap.final_logit_softcap`) before all this, and the cap's derivative in the backward pass.
The input gradient of every TP rank is its partial sum, reduced as megatron-core's ColumnParallelLinear reduces
it (all-reduce; reduce-scatter under sequence parallelism). The weight gradient goes through autograd
into the weight itself: the output layer's on the last stage, which `finalize_model_grads` all-reduces
with the first stage's embedding when they are tied.

Which targets are computed: with autograd on (training), those with loss_mask and a non-zero weight;
with autograd off (validation, forward-only), every target in loss_mask. The prompt/response NLL
report is exact for the targets computed and counts only them: at λ_p = 0 a training step reports no
prompt targets, validation reports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from wit_megatron.layers.softcap import final_logit_softcap

LossImpl = Literal["unfused", "chunked"]
LOSS_IMPLS: tuple[str, ...] = ("unfused", "chunked")
# Tokens per chunk. At Llama-3's vocabulary (128,256) and TP 1 a chunk's float32 logits are 0.5 GiB.
DEFAULT_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class OutputLoss:
    """How the last pipeline stage turns hidden states into per-token NLL."""

    impl: LossImpl = "unfused"  # unfused: megatron-core's output layer and cross entropy
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunked: tokens whose logits exist at one time

    def __post_init__(self):
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"output loss implementation {self.impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 token, got {self.chunk_size}")

    @property
    def chunked(self) -> bool:
        return self.impl == "chunked"


def targets_to_compute(loss_weights: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool mask of the targets the chunked path computes: with autograd on, those of non-zero weight
    (within loss_mask); with autograd off (validation), every target in loss_mask, so that the
    prompt/response report covers them all."""
    mask = torch.ones_like(loss_weights, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    return mask & (loss_weights != 0) if torch.is_grad_enabled() else mask


class _ChunkedVocabParallelNLL(torch.autograd.Function):
    """NLL of `labels` under logits = hidden @ weightᵀ, the vocabulary split over the TP group.

    hidden [n, h] is the same on every TP rank; weight [v, h] holds this rank's vocabulary rows
    [rank·v, (rank+1)·v). Returns float32 NLL [n], the same on every TP rank. The gradient for
    `hidden` is this rank's partial sum over its vocabulary rows: the caller reduces it over TP."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, tp_group, for_backward: bool, cap: Optional[float]):
        n, v = hidden.shape[0], weight.shape[0]
        rank, size = _rank_and_size(tp_group)
        local = labels - rank * v
        in_shard = (local >= 0) & (local < v)
        local = torch.where(in_shard, local, 0)
        maxes = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sums, nll = torch.empty_like(maxes), torch.empty_like(maxes)
        for start in range(0, n, chunk_size):  # n is the same on every TP rank: their batches are broadcast copies
            rows = slice(start, start + chunk_size)
            # megatron-core's steps and collectives (VocabParallelCrossEntropy), on one chunk's logits.
            logits = _logits(hidden[rows], weight, cap)
            chunk_max = logits.max(dim=-1).values
            if size > 1:
                torch.distributed.all_reduce(chunk_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            logits -= chunk_max[:, None]
            target = torch.where(in_shard[rows], logits.gather(1, local[rows, None]).squeeze(1), 0.0)
            target_and_sum = torch.stack([target, logits.exp_().sum(dim=-1)])
            if size > 1:
                torch.distributed.all_reduce(target_and_sum, group=tp_group)
            maxes[rows], sums[rows] = chunk_max, target_and_sum[1]
            nll[rows] = torch.log(target_and_sum[1]) - target_and_sum[0]  # log Σ exp(l - max) - (l_target - max)
        # All targets in one chunk: its softmax is the one chunk of logits the backward pass would hold anyway,
        # so it is kept rather than recomputed. Otherwise the backward pass recomputes the logits (always
        # under soft-capping, whose gradient needs the logits before the cap too).
        keep = for_backward and 0 < n <= chunk_size and cap is None
        ctx.softmax = logits.div_(sums[:, None]) if keep else None
        ctx.save_for_backward(hidden, weight, local, in_shard, maxes, sums)
        ctx.chunk_size, ctx.cap = chunk_size, cap
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, local, in_shard, maxes, sums = ctx.saved_tensors
        softmax, ctx.softmax = ctx.softmax, None
        if softmax is not None:
            grad_logits = _softmax_to_grad(softmax, weight, 0, local, in_shard, grad_nll.float())
            return torch.mm(grad_logits, weight), torch.mm(grad_logits.t(), hidden), None, None, None, None, None
        backward = _backward_in_token_chunks if weight.dtype == torch.float32 else _backward_in_vocab_blocks
        grad_hidden, grad_weight = backward(hidden, weight, local, in_shard, maxes, sums, grad_nll.float(), ctx.chunk_size,
                                            ctx.cap)
        return grad_hidden, grad_weight, None, None, None, None, None


def _logits(hidden, weight, cap: Optional[float]) -> torch.Tensor:
    """Float32 logits hidden @ weightᵀ as the model's output layer gives them to the cross entropy: in the
    weight's dtype, soft-capped where the model caps them (Gemma-2), then float32."""
    return final_logit_softcap(F.linear(hidden, weight), cap).float()


def _grad_logits(hidden, weight, vocab_start: int, local, in_shard, maxes, sums, grad_nll,
                 cap: Optional[float]) -> torch.Tensor:
    """(softmax - one-hot target) · grad of the logits hidden @ weightᵀ (weight: rows from vocab_start of
    this rank's shard), in the weight's dtype, computed as megatron-core's cross entropy computes it; under
    soft-capping, times the cap's derivative 1 - tanh²(logit / cap) as autograd applies it."""
    if cap is None:
        softmax = _logits(hidden, weight, None).sub_(maxes[:, None]).exp_().div_(sums[:, None])
        return _softmax_to_grad(softmax, weight, vocab_start, local, in_shard, grad_nll)
    raw = F.linear(hidden, weight)
    softmax = final_logit_softcap(raw, cap).float().sub_(maxes[:, None]).exp_().div_(sums[:, None])
    grad_capped = _softmax_to_grad(softmax, weight, vocab_start, local, in_shard, grad_nll)
    del softmax
    slope = torch.tanh(raw.float().div_(cap)).square_().neg_().add_(1)
    return slope.mul_(grad_capped.float()).to(weight.dtype)


def _softmax_to_grad(softmax, weight, vocab_start: int, local, in_shard, grad_nll) -> torch.Tensor:
    """In place: softmax - one-hot target, times the NLL's gradient, cast to the weight's dtype."""
    hit = in_shard & (local >= vocab_start) & (local < vocab_start + weight.shape[0])
    column = (local - vocab_start).clamp_(0, weight.shape[0] - 1)[:, None]
    softmax.scatter_add_(1, column, -hit.to(torch.float32)[:, None])
    return softmax.mul_(grad_nll[:, None]).to(weight.dtype)


def _backward_in_token_chunks(hidden, weight, local, in_shard, maxes, sums, grad_nll, chunk_size: int, cap):
    """float32: each chunk's input gradient in one matmul over the whole vocabulary shard, as Megatron's;
    the weight gradient summed over the chunks in place."""
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)
    if hidden.shape[0] == 0:
        grad_weight.zero_()
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        grad_logits = _grad_logits(hidden[rows], weight, 0, local[rows], in_shard[rows], maxes[rows], sums[rows],
                                   grad_nll[rows], cap)
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if start == 0:  # written, not added to zeros: the weight gradient is as large as the weight
            torch.mm(grad_logits.t(), hidden[rows], out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.t(), hidden[rows])
        del grad_logits
    return grad_hidden, grad_weight


def _backward_in_vocab_blocks(hidden, weight, local, in_shard, maxes, sums, grad_nll, chunk_size: int, cap):
    """bf16/fp16: summing the weight gradient over token chunks would need a float32 copy of it (4 bytes x
    vocab/TP x hidden). Blocks of the vocabulary rows instead, with as many logits as a chunk: each block's
    weight gradient is one matmul over all tokens (one rounding, as Megatron's), and only the input
    gradient [tokens, hidden] sums over the blocks, in float32."""
    n, v = hidden.shape[0], weight.shape[0]
    block = max(1, min(v, chunk_size * v // max(n, 1)))
    grad_weight = torch.empty_like(weight)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, v, block):
        w = weight[start:start + block]
        grad_logits = _grad_logits(hidden, w, start, local, in_shard, maxes, sums, grad_nll, cap)
        torch.mm(grad_logits.t(), hidden, out=grad_weight[start:start + block])
        grad_hidden += torch.mm(grad_logits, w)
        del grad_logits
    return grad_hidden.to(hidden.dtype), grad_weight


def _rank_and_size(group) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def vocab_parallel_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                       tp_group=None, softcap: Optional[float] = None) -> torch.Tensor:
    """Float32 NLL [n] of `labels` [n] (vocabulary ids) under logits hidden [n, h] @ weight [vocab/TP, h]ᵀ
    (soft-capped as cap·tanh(logit / cap) with `softcap`, the model's final_logit_softcapping), computed
    `chunk_size` tokens at a time. `hidden` must be identical on the TP ranks and its gradient reduced over
    them by the caller (see `output_layer_nll`)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [n, h] and [vocab/TP, h]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but the output weight is {weight.dtype}: the output layer needs one dtype")
    for_backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedVocabParallelNLL.apply(hidden, weight, labels, chunk_size, tp_group, for_backward, softcap)


def output_layer_nll(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, select: torch.Tensor,
                     chunk_size: int, sequence_parallel: bool = False, tp_group=None,
                     softcap: Optional[float] = None) -> torch.Tensor:
    """The output layer and cross entropy of the targets in `select`, in chunks.

    Args:
        hidden_states: [s, b, h] the decoder's output (after the final norm); [s/TP, b, h] under
            sequence parallelism.
        weight: [vocab/TP, h] this rank's output weight (the embedding's when tied on one stage).
        labels, select: [b, s] target ids, and the targets to compute (`targets_to_compute`).
        softcap: the model's final-logit soft-capping (Gemma-2), None without.
    Returns float32 NLL [b, s]: the targets in `select`, 0 elsewhere.
    """
    from megatron.core import tensor_parallel

    if labels.shape != select.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and select {tuple(select.shape)} differ in shape")
    # Forward: the input as the output layer sees it; backward: the TP ranks' partial input gradients
    # summed, as ColumnParallelLinear does (reduce-scatter back to sequence shards, or all-reduce).
    if sequence_parallel:
        hidden_states = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, True, group=tp_group)
    elif _rank_and_size(tp_group)[1] > 1:
        hidden_states = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    if (b, s) != tuple(labels.shape):
        raise ValueError(f"hidden states {tuple(hidden_states.shape)} ([s, b, h]) do not match labels {tuple(labels.shape)} ([b, s])")
    index = select.t().reshape(-1).nonzero().squeeze(1)  # [s, b] order, as the hidden states
    nll = vocab_parallel_nll(hidden_states.reshape(s * b, h).index_select(0, index), weight,
                             labels.t().reshape(-1).index_select(0, index), chunk_size, tp_group, softcap)
    # Scattered back into [b, s]; every other position gets 0 and no gradient.
    out = torch.zeros(s * b, dtype=nll.dtype, device=nll.device).index_put((index,), nll)
    return out.view(s, b).t()


def chunked_model_forward(model: torch.nn.Module, tokens, position_ids, attention_mask, labels, select: Optional[torch.Tensor],
                          chunk_size: int, packed_seq_params=None) -> torch.Tensor:
    """`model(tokens, position_ids, attention_mask, labels=labels)` of a megatron-core GPTModel chunk
    (inside DDP / Float16Module wrappers), with the output layer and cross entropy of a last stage
    replaced by `output_layer_nll` of the targets in `select` ([b, s] like `labels`).

    Returns what GPTModel returns: float32 NLL [b, s] on a last stage (0 outside `select`), the
    hidden states elsewhere."""
    from wit_megatron.model import unwrap
    from wit_megatron.runtime import compat

    inner = unwrap(model)
    if not inner.post_process:
        return model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed_seq_params)
    check_supported(inner.config)
    if select is None:
        raise ValueError("the chunked output layer needs the micro-batch's loss weights on the last pipeline stage")

    def processor(*, hidden_states, output_layer, output_weight, labels, **_):
        weight = output_weight if output_weight is not None else output_layer.weight
        return output_layer_nll(hidden_states, weight, labels, select, chunk_size,
                                sequence_parallel=output_layer.sequence_parallel, tp_group=output_layer.tp_group,
                                softcap=getattr(inner.config, "final_logit_softcapping", None))

    return compat.gpt_forward_with_output_processor(model, processor, tokens, position_ids, attention_mask, labels=labels,
                                                    packed_seq_params=packed_seq_params)


def check_supported(config) -> None:
    """Refuse model options that change the output layer in ways the chunked path does not reproduce."""
    unsupported = {
        "mtp_num_layers": "multi-token prediction (its extra output layers and losses)",
        "use_mup": "MuP's logit scaling",
        "defer_embedding_wgrad_compute": "deferred output-layer weight gradients (the chunked path computes them itself)",
    }
    on = [f"{name} ({why})" for name, why in unsupported.items() if getattr(config, name, None)]
    if on:
        raise ValueError(f"--wit-loss-impl chunked does not support {', '.join(on)}; use --wit-loss-impl unfused")
