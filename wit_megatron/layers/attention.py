"""Attention pieces megatron-core lacks: soft-capped scores, sliding windows that keep a packed-records
mask, and a RoPE base of their own for sliding-window layers.

- `CoreAttention`: unfused dot-product attention. scores = softmax_scale·q·kᵀ, then tanh soft-capping
  (`config.attn_logit_softcapping`), then the mask (causal, the layer's sliding window, packed records),
  softmax in float32, as transformers' Gemma computes it. Used on the local spec whenever a model has
  soft-capping or sliding windows: megatron-core's DotProductAttention has no soft-capping, and with a
  window it replaces the packed-records mask by the window's. On the Transformer Engine spec it is used
  for soft-capping only (TE's fused kernels have none; TE's own attention does windows), and takes packed
  records as THD `cu_seqlens`.
- `LocalGlobalRotaryEmbedding` + `SelfAttentionWithLocalRope`: Gemma-3's sliding-window layers rotate
  with another RoPE base than its global layers. GPTModel computes one RoPE tensor for all layers; this
  one stacks [global, local] and each layer takes its own.

A layer is a sliding-window layer when megatron-core's `is_layer_window_attention(config.window_size,
config.window_attn_skip_freq, layer_number)` says so: the rule megatron-core's and TE's attention use.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


def is_windowed(config, layer_number: int) -> bool:
    """Whether layer `layer_number` (1-based, over the whole model) attends through a sliding window."""
    return is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)


class CoreAttention(MegatronModule):
    """Dot-product attention with a softmax scale, score soft-capping and this layer's sliding window."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("CoreAttention has no context parallelism (Transformer Engine's attention has, without soft-capping)")
        if attn_mask_type != AttnMaskType.causal or config.apply_query_key_layer_scaling:
            raise ValueError("CoreAttention computes causal self-attention without query-key layer scaling")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.cap = getattr(config, "attn_logit_softcapping", None)
        self.window = None
        if is_windowed(config, layer_number):
            left, right = config.window_size
            if right != 0:
                raise ValueError(f"window_size {config.window_size}: a causal sliding window has no right part")
            self.window = left  # a query sees itself and the `left` tokens before it
        self.dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None, packed_seq_params=None, **kwargs):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (THD: [t, n, hn]); attention_mask None or bool
        [b or 1, 1, sq, sk], True = masked (packed records). Returns [sq, b, np·hn]."""
        if attention_bias is not None:
            raise ValueError("CoreAttention takes no attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # one flat sequence
            attention_mask = records_mask(packed_seq_params.cu_seqlens_q, query.shape[0])
        sq, b, heads, dim = query.shape
        sk = key.shape[0]
        repeat = self.heads // self.groups
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.repeat_interleave(repeat, dim=2).permute(1, 2, 3, 0)  # [b, np, hn, sk]
        v = value.repeat_interleave(repeat, dim=2).permute(1, 2, 0, 3)  # [b, np, sk, hn]
        scores = torch.matmul(q, k).float() * self.softmax_scale
        if self.cap is not None:
            scores = torch.tanh(scores / self.cap) * self.cap
        blocked = self._blocked(sq, sk, scores.device)
        if attention_mask is not None:
            blocked = blocked | attention_mask.bool()
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        if self.training and self.dropout.p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        context = torch.matmul(probs, v)  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _blocked(self, sq: int, sk: int, device) -> torch.Tensor:
        """[sq, sk] True where query i may not see key j: later keys, and keys beyond the window."""
        i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=device).unsqueeze(0)
        blocked = j > i
        if self.window is not None:
            blocked = blocked | (i - j > self.window)
        return blocked

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        return {}  # no parameters


def records_mask(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True between tokens of different records of a THD sequence (`cu_seqlens` [n + 1])."""
    starts = torch.zeros(tokens, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    record = starts.cumsum(0)
    return (record.unsqueeze(1) != record.unsqueeze(0)).view(1, 1, tokens, tokens)


class LocalGlobalRotaryEmbedding(torch.nn.Module):
    """GPTModel's RoPE module for models whose sliding-window layers have a RoPE base of their own: the
    same calls as megatron-core's RotaryEmbedding, answered by both, stacked [global, local] in one tensor
    (a tensor, so activation recomputation can pass it on)."""

    def __init__(self, global_rope: torch.nn.Module, local_rope: torch.nn.Module):
        super().__init__()
        self.global_rope, self.local_rope = global_rope, local_rope

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.global_rope.get_rotary_seq_len(*args, **kwargs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.stack([self.global_rope(*args, **kwargs), self.local_rope(*args, **kwargs)])


class SelfAttentionWithLocalRope(SelfAttention):
    """SelfAttention that takes the local RoPE on sliding-window layers and the global one elsewhere, from
    the [global, local] stack of `LocalGlobalRotaryEmbedding`."""

    def forward(self, *args, rotary_pos_emb: Optional[torch.Tensor] = None, **kwargs):
        if rotary_pos_emb is not None:
            rotary_pos_emb = rotary_pos_emb[1 if is_windowed(self.config, self.layer_number) else 0]
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)
