"""Context-parallel attention that runs on CPU, so that cp >= 2 can be tested without Transformer Engine.

megatron-core's only context-parallel attention is Transformer Engine's (ring exchange of K/V between
the CP ranks, GPU kernels); its local `DotProductAttention` refuses cp > 1. `AllGatherCPAttention` is
that local attention with the exchange done the plain way: every CP rank all-gathers K and V of the
whole sequence (undoing Megatron's load-balanced 2×CP chunk order), then its queries attend causally
by their global positions, in the same float32 softmax as the local spec. Its backward sums each K/V
gradient over the CP ranks and keeps this rank's rows.

Everything else at cp >= 2 is megatron-core's own: get_batch's slicing, RoPE's per-rank positions,
the loss on each rank's tokens, N and the gradients reduced over the data×context-parallel group in
`finalize_model_grads`. So a model built with `cp_layer_spec` checks the WIT loss and gradients at
cp >= 2 on CPU; Transformer Engine's ring attention itself is left to tests/gpu/check_wit_gpu.py.
"""

from __future__ import annotations

import copy

import torch

from wit_megatron.model import GPTArch, layer_spec


class _GatherSequence(torch.autograd.Function):
    """[s_local, ...] on each CP rank -> [CP, s_local, ...]; backward: the sum over ranks, own slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(group.size())]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.group.rank()], None


def global_positions(cp_rank: int, cp_size: int, local_len: int) -> torch.Tensor:
    """Positions in the whole sequence of a CP rank's tokens: chunks r and 2·CP-1-r of 2·CP chunks."""
    chunk = local_len // 2
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def whole_sequence(gathered: torch.Tensor) -> torch.Tensor:
    """[CP, s_local, ...] gathered from the ranks -> [CP·s_local, ...] in sequence order."""
    cp = gathered.shape[0]
    halves = gathered.unflatten(1, (2, -1))  # [CP, 2, chunk, ...]: rank r holds chunks r and 2·CP-1-r
    return torch.cat([halves[r, 0] for r in range(cp)] + [halves[r, 1] for r in reversed(range(cp))])


class AllGatherCPAttention(torch.nn.Module):
    """Drop-in core attention for the local layer spec at any CP size (causal self-attention, no packing)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        super().__init__()
        self.cp_group = ps.get_context_parallel_group()
        local_config = copy.copy(config)
        local_config.context_parallel_size = 1  # the attention below sees the whole sequence's K/V
        self.attention = DotProductAttention(local_config, layer_number, attn_mask_type, attention_type, **kwargs)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_mask is not None or packed_seq_params is not None:
            raise NotImplementedError("AllGatherCPAttention does causal self-attention only (no masks, no packing)")
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        if cp_size > 1:
            key, value = (whole_sequence(_GatherSequence.apply(t, self.cp_group)) for t in (key, value))
        q_pos = global_positions(cp_rank, cp_size, query.shape[0]) if cp_size > 1 else torch.arange(query.shape[0])
        future = torch.arange(key.shape[0]).unsqueeze(0) > q_pos.unsqueeze(1)  # [sq, sk]: True = masked
        return self.attention(query, key, value, future.to(query.device)[None, None])


def cp_layer_spec(arch: GPTArch):
    """megatron-core's local layer spec with `AllGatherCPAttention` as its core attention."""
    spec = copy.deepcopy(layer_spec(arch, "local"))
    spec.submodules.self_attention.submodules.core_attention = AllGatherCPAttention
    return spec
