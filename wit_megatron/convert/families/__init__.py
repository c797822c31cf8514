"""Model families: one declarative table each (HF tensor names <-> Megatron-Core checkpoint keys).

A `Rule` maps the HF tensors of one Megatron tensor through a transform. Megatron keys are the
keys of megatron-core's torch_dist checkpoints (`GPTModel.sharded_state_dict()`): layers stacked
under `decoder.layers.<param>`, norms under Transformer Engine's fused names. `local` gives the
parameter name of the local (torch) layer spec where it differs, for in-memory state dicts.

Adding a family adds a module with a `FAMILY` table and one line in `FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from wit_megatron.convert.transforms import COPY, ConversionError, head_dim
from wit_megatron.model import GPTArch


@dataclass(frozen=True)
class Rule:
    megatron: str  # checkpoint key; per-layer keys start with "decoder.layers." and stack layers
    hf: tuple[str, ...]  # HF tensor names; "{i}" is the layer index
    transform: Any = COPY
    when: Optional[str] = None  # name of a predicate in CONDITIONS: the rule applies only if it holds
    local: Optional[str] = None  # local-spec parameter name ("{i}" = layer) if not the key's

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith("decoder.layers.")

    def applies(self, arch: GPTArch) -> bool:
        return self.when is None or CONDITIONS[self.when](arch)

    def hf_names(self, layer: Optional[int] = None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]

    def param_name(self, spec: str, layer: Optional[int] = None) -> str:
        """The parameter name in a single-rank GPTModel built with `spec` ('te' or 'local')."""
        if spec == "local" and self.local:
            return self.local.format(i=layer)
        if self.per_layer:
            return self.megatron.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)
        return self.megatron


CONDITIONS: dict[str, Callable[[GPTArch], bool]] = {
    "untied": lambda a: not a.tie_embeddings,
    "qkv_bias": lambda a: a.add_qkv_bias or a.add_bias_linear,
    "linear_bias": lambda a: a.add_bias_linear,
    "qk_norm": lambda a: a.qk_layernorm,
}


def megatron_shapes(arch: GPTArch) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of the tensor in a single-rank GPTModel (one layer's for the stacked
    `decoder.layers.*` keys), for every key a table can name. Lets the exporter check a checkpoint
    against its record without building a model; tests compare it with megatron-core's own."""
    h, d, ffn = arch.hidden_size, head_dim(arch), arch.ffn_hidden_size
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    attention, mlp = "decoder.layers.self_attention.", "decoder.layers.mlp."
    return {
        "embedding.word_embeddings.weight": (arch.vocab_size, h),
        attention + "linear_qkv.layer_norm_weight": (h,),
        attention + "linear_qkv.weight": (qkv, h),
        attention + "linear_qkv.bias": (qkv,),
        attention + "q_layernorm.weight": (d,),
        attention + "k_layernorm.weight": (d,),
        attention + "linear_proj.weight": (h, arch.num_attention_heads * d),
        attention + "linear_proj.bias": (h,),
        mlp + "linear_fc1.layer_norm_weight": (h,),
        mlp + "linear_fc1.weight": (2 * ffn, h),
        mlp + "linear_fc1.bias": (2 * ffn,),
        mlp + "linear_fc2.weight": (h, ffn),
        mlp + "linear_fc2.bias": (h,),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (arch.vocab_size, h),
    }


def hf_shapes(rule: Rule, arch: GPTArch) -> list[tuple[int, ...]]:
    """The shapes `arch` implies for a rule's HF tensors (one layer's): its Megatron tensor's shape
    taken back through the transform on the meta device, so each transform states them once, for
    both directions."""
    meta = torch.empty(megatron_shapes(arch)[rule.megatron], device="meta")
    return [tuple(t.shape) for t in rule.transform.to_hf(meta, arch)]


@dataclass(frozen=True)
class Refusal:
    """An HF config value Megatron-Core cannot represent exactly: conversion stops with `why`."""

    key: str
    acceptable: Callable[[Any, dict], bool]  # (value, whole config) -> ok
    why: str


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    # GPTArch field -> HF config key (value copied) ...
    config: dict[str, str]
    # ... or GPTArch field -> fixed value / HF key whose value is used as a bool
    fixed: dict[str, Any] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()

    def rules_for(self, arch: GPTArch) -> list[Rule]:
        return [r for r in self.rules if r.applies(arch)]


def _families() -> dict[str, Family]:
    from wit_megatron.convert.families import llama, mistral, qwen2, qwen3

    table = {}
    for module in (llama, mistral, qwen2, qwen3):
        for architecture in module.FAMILY.architectures:
            table[architecture] = module.FAMILY
    return table


def supported_architectures() -> list[str]:
    return sorted(_families())


def family_for(hf_config: dict) -> tuple[str, Family]:
    """The family of an HF config (by its `architectures`), or a ConversionError naming what is supported."""
    names = hf_config.get("architectures") or []
    table = _families()
    for name in names:
        if name in table:
            return name, table[name]
    raise ConversionError(
        f"unsupported architecture {names or '(config.json has no architectures)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
