"""The few tensor transforms between Hugging Face and Megatron-Core layouts.

Each transform maps the list of HF tensors of one rule to one Megatron tensor and back, exactly
(only views, concatenation and zero padding: the round trip is bit-identical). Shapes are checked
and a mismatch raises `ConversionError` naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from wit_megatron.checkpoint import CheckpointError
from wit_megatron.model import GPTArch


class ConversionError(CheckpointError):
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
    """HF q [nh·d, ...], k [K·d, ...], v [K·d, ...] <-> Megatron linear_qkv [(nh + 2·ng)·d, ...].

    Megatron groups rows by query group g: the nh/ng query heads of g, then g's key head, then g's
    value head. Tensor parallelism then splits whole groups, so GQA and MQA need no special case.
    With `arch.kv_replicas` = R > 1 there are ng = K·R groups and group g holds a copy of HF KV head
    g // R: query head h sits in group h // (nh/ng), whose source h // (nh/K) is its HF KV head, as
    in the HF model. Export takes the first copy and requires all R to be bitwise identical.
    Works for weights ([rows, hidden]) and biases ([rows]).
    """

    name = "qkv interleave"

    def to_megatron(self, hf: Sequence[torch.Tensor], arch: GPTArch) -> torch.Tensor:
        q, k, v = hf
        d, nh, ng, kv, r = _heads(arch)
        for label, tensor, heads in (("q", q, nh), ("k", k, kv), ("v", v, kv)):
            if tensor.shape[0] != heads * d:
                raise ConversionError(
                    f"{label} projection has {tensor.shape[0]} rows, config says {heads} heads x head dim {d}"
                )
        rest = q.shape[1:]
        per_group = nh // ng

        def groups(t):  # [K·d, ...] -> [ng, d, ...]: each head R times, consecutively
            return t.reshape(kv, 1, d, *rest).expand(kv, r, d, *rest).reshape(ng, d, *rest)

        grouped = torch.cat([q.reshape(ng, per_group * d, *rest), groups(k), groups(v)], dim=1)
        return grouped.reshape((nh + 2 * ng) * d, *rest)

    def to_hf(self, megatron: torch.Tensor, arch: GPTArch) -> list[torch.Tensor]:
        d, nh, ng, kv, r = _heads(arch)
        rest = megatron.shape[1:]
        per_group = nh // ng
        grouped = megatron.reshape(ng, (per_group + 2) * d, *rest)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        k, v = (_first_copy(label, t.reshape(kv, r, d, *rest)) for label, t in (("k", k), ("v", v)))
        return [q.reshape(nh * d, *rest), k, v]


def _heads(arch: GPTArch) -> tuple[int, int, int, int, int]:
    """(head dim, query heads, Megatron's query groups, HF KV heads, copies of each)."""
    return head_dim(arch), arch.num_attention_heads, arch.num_query_groups, arch.hf_kv_heads, arch.kv_replicas


def _first_copy(label: str, copies: torch.Tensor) -> torch.Tensor:
    """[K, R, d, ...] -> [K·d, ...] from copy 0, refusing copies that are not bitwise identical."""
    first = copies[:, :1]
    if copies.shape[1] > 1 and not copies.is_meta:  # planning passes meta tensors: shapes only
        # Bitwise, as the copies are written and trained: -0.0 is not 0.0, equal NaNs are equal.
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[copies.element_size()]
        same = (copies.view(bits) == first.view(bits)).flatten(2).all(-1)  # [K, R]
        if not same.all():
            head, copy = (int(i) for i in (~same).nonzero()[0])
            delta = (copies.double() - first.double()).abs().max().item()
            raise ConversionError(
                f"the {copies.shape[1]} copies of each KV head (kv_replicas) are not identical: {label} head {head} "
                f"copy {copy} differs from copy 0 (largest |difference| over all copies: {delta:.3g}). The copies "
                "diverged: the model was trained without summing the copies' gradients (wit_megatron.training.step.train_step "
                "does), so it no longer corresponds to one HF model"
            )
    return first.reshape(-1, *copies.shape[3:])


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
