"""Model families: one module each in this folder, holding everything about the family.

A family module builds a `Family` and passes it to `register`, which every module of this folder does
when `family_for` first looks a family up: nothing else names it. Its `Family` gives
- the tensor table: a `Rule` maps the HF tensors of one Megatron tensor through a transform. Megatron
  keys are the keys of megatron-core's torch_dist checkpoints (`GPTModel.sharded_state_dict()`): layers
  stacked under `decoder.layers.<param>`, norms under Transformer Engine's fused names; `local` gives
  the parameter name of the local (torch) layer spec where it differs, for in-memory state dicts;
- the config table: GPTArch fields copied from config.json keys, fixed values (the family's norm,
  activation and the like), `derived` fields computed from the config (RoPE, embedding multiplier,
  sliding windows), the HF config class's defaults for keys config.json may omit, and the refusals of
  what Megatron-Core cannot represent exactly;
- `examples`: tiny configs of the family's transformers config class, which the conversion tests build
  and check (round trip, logits at every layout) like every other family's.
To add a family, copy the module of the closest one (`gemma2.py` for a Gemma-like family, `qwen3.py`
for a Llama-like one); the model side reads only GPTArch fields (wit_megatron.model).
"""

from __future__ import annotations

import importlib
import pkgutil
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
        attention + "linear_proj.post_layernorm.weight": (h,),
        mlp + "linear_fc1.layer_norm_weight": (h,),
        mlp + "linear_fc1.weight": (2 * ffn, h),
        mlp + "linear_fc1.bias": (2 * ffn,),
        mlp + "linear_fc2.weight": (h, ffn),
        mlp + "linear_fc2.bias": (h,),
        mlp + "linear_fc2.post_layernorm.weight": (h,),
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


def uniform_rope(config: dict) -> dict:
    """RoPE fields of a config with one RoPE for every layer (see hf_config.rope_settings)."""
    from wit_megatron.convert.hf_config import rope_settings

    base, factor = rope_settings(config)
    return {"rotary_base": base, "rope_scaling_factor": factor}


@dataclass(frozen=True)
class HFFlag:
    """A `Family.fixed` value read from an HF config key as a truth value (add_bias_linear <- attention_bias)."""

    key: str


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    # GPTArch field -> HF config key (value copied) ...
    config: dict[str, str]
    # ... or GPTArch field -> fixed value (the family's norm, activation, ...) or HFFlag
    fixed: dict[str, Any] = field(default_factory=dict)
    refusals: tuple[Refusal, ...] = ()
    # GPTArch fields computed from the whole config (after the refusals): RoPE and what the table cannot copy.
    derived: Callable[[dict], dict] = uniform_rope
    # The HF config class's defaults for keys config.json may omit, as transformers reads the file.
    hf_defaults: dict[str, Any] = field(default_factory=dict)
    # Tiny test models: name -> (transformers config class, its arguments over tests/convert_models.BASE).
    examples: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def rules_for(self, arch: GPTArch) -> list[Rule]:
        return [r for r in self.rules if r.applies(arch)]


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` convertible: called by its module, once, for every HF architecture it names."""
    for architecture in family.architectures:
        if architecture in _REGISTRY and _REGISTRY[architecture] is not family:
            raise ValueError(f"two families claim the HF architecture {architecture}")
        _REGISTRY[architecture] = family
    return family


def _families() -> dict[str, Family]:
    """Every family of this folder, registered by importing its module."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return _REGISTRY


def families() -> list[Family]:
    """Every registered family, once each."""
    return list({id(f): f for f in _families().values()}.values())


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
