"""The few tensor transforms between Hugging Face and Megatron-Core layouts.

Each transform maps the list of HF tensors of one rule to one Megatron tensor and back, exactly
(only views, concatenation and zero padding: the round trip is bit-identical). Shapes are checked
and a mismatch raises `ConversionError` naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from wit_megatron.model import GPTArch


class ConversionError(ValueError):
    """A checkpoint, its config or a request cannot be converted exactly; the message says why."""


def head_dim(arch: GPTArch) -> int:
    return arch.kv_channels or arch.hidden_size // arch.num_attention_heads


@dataclass(frozen=True)
class Copy:
    """The same tensor on both sides."""

    name = "copy"

    def to_megatron(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> torch.Tensor:
        (tensor,) = hf
        return tensor

    def to_hf(self, megatron: torch.Tensor, arch: GPTArch) -> list[torch.Tensor]:
        return [megatron]


@dataclass(frozen=True)
class InterleaveQKV:
    """HF q [nh·d, ...], k [ng·d, ...], v [ng·d, ...] <-> Megatron linear_qkv [(nh + 2·ng)·d, ...].

    Megatron groups rows by query group g: the nh/ng query heads of g, then g's key head, then g's
    value head. Tensor parallelism then splits whole groups, so GQA and MQA need no special case.
    Works for weights ([rows, hidden]) and biases ([rows]).
    """

    name = "qkv interleave"

    def to_megatron(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> torch.Tensor:
        q, k, v = hf
        d, nh, ng = head_dim(arch), arch.num_attention_heads, arch.num_query_groups
        for label, tensor, heads in (("q", q, nh), ("k", k, ng), ("v", v, ng)):
            if tensor.shape[0] != heads * d:
                raise ConversionError(
                    f"{label} projection has {tensor.shape[0]} rows, config says {heads} heads x head dim {d}"
                )
        rest = q.shape[1:]
        per_group = nh // ng
        return torch.cat(
            [q.reshape(ng, per_group * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1
        ).reshape((nh + 2 * ng) * d, *rest)

    def to_hf(self, megatron: torch.Tensor, arch: GPTArch) -> list[torch.Tensor]:
        d, nh, ng = head_dim(arch), arch.num_attention_heads, arch.num_query_groups
        rest = megatron.shape[1:]
        per_group = nh // ng
        grouped = megatron.reshape(ng, (per_group + 2) * d, *rest)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        return [q.reshape(nh * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)]


@dataclass(frozen=True)
class ConcatGateUp:
    """HF gate [ffn, h] and up [ffn, h] <-> Megatron linear_fc1 [2·ffn, h] = [gate; up].

    This is fc1's global layout at every TP size: megatron-core's sharded_state_dict stores the gated
    MLP with a factory that keeps [all gate rows; all up rows] however the ranks split it."""

    name = "gate|up concat"

    def pieces(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> list[torch.Tensor]:
        """The pieces megatron-core's gated-MLP factory saves, in its order: [gate, up]."""
        gate, up = hf
        if gate.shape != up.shape or gate.shape[0] != arch.ffn_hidden_size:
            raise ConversionError(
                f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must both have "
                f"intermediate_size={arch.ffn_hidden_size} rows"
            )
        return [gate, up]

    def to_megatron(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> torch.Tensor:
        return torch.cat(self.pieces(hf, arch), dim=0)

    def to_hf(self, megatron: torch.Tensor, arch: GPTArch) -> list[torch.Tensor]:
        return list(megatron.chunk(2, dim=0))


@dataclass(frozen=True)
class PadVocab:
    """HF [vocab, h] <-> Megatron [padded vocab, h]: zero rows appended on import, removed on export."""

    name = "vocab pad"

    def to_megatron(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> torch.Tensor:
        (tensor,) = hf
        vocab = arch.tokenizer_vocab_size
        if tensor.shape[0] != vocab:
            raise ConversionError(f"has {tensor.shape[0]} rows, config says vocab_size={vocab}")
        padding = arch.vocab_size - vocab
        if padding == 0:
            return tensor
        return torch.cat([tensor, tensor.new_zeros(padding, *tensor.shape[1:])])

    def to_hf(self, megatron: torch.Tensor, arch: GPTArch) -> list[torch.Tensor]:
        return [megatron[: arch.tokenizer_vocab_size]]


COPY = Copy()
QKV = InterleaveQKV()
GATE_UP = ConcatGateUp()
VOCAB = PadVocab()
