"""Gemma-3, text only (Gemma3ForCausalLM): Gemma-2's decoder (gemma2.py) with per-head q/k RMSNorms,
no soft-capping by default, every `sliding_window_pattern`-th layer global (default 6), and a RoPE of
their own for the sliding-window layers (`rope_local_base_freq`, 10000; global 1e6, optionally with
linear scaling: transformers' `rope_scaling`, which applies to the global layers only).
"""

from dataclasses import replace
from typing import Optional

from wit_megatron.convert.families import gemma2, register
from wit_megatron.convert.hf_config import number
from wit_megatron.convert.transforms import ConversionError

HF_DEFAULTS = {**gemma2.HF_DEFAULTS, "attn_logit_softcapping": None, "final_logit_softcapping": None,
               "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}


def _rope(where: str, params) -> tuple[float, Optional[float]]:
    """(base, linear scaling factor or None) of one layer type's RoPE parameters."""
    if not isinstance(params, dict) or params.get("rope_theta") is None:
        raise ConversionError(f"config.json {where}={params!r}: expected an object with rope_theta")
    if params.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConversionError(f"config.json {where}.partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                              "(only 1.0: RoPE on the whole head)")
    theta = number(f"{where}.rope_theta", params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, number(f"{where}.factor", params.get("factor"))
    raise ConversionError(f"config.json {where}: rope type {kind!r} cannot be represented in Megatron-Core's GPTModel; "
                          "supported: 'default', and 'linear' on the global layers")


def rope_fields(config: dict, windowed: bool) -> dict:
    """RoPE of the global layers (base, linear factor) and of the sliding-window ones (their base), from
    transformers v5's per-layer-type `rope_parameters` or the older rope_theta / rope_local_base_freq /
    rope_scaling keys."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        unknown = sorted(set(params) - set(gemma2.LAYER_TYPES))
        if unknown:
            raise ConversionError(f"config.json rope_parameters has settings for unknown layer types {unknown}")
        global_params, local_params = params.get("full_attention"), params.get("sliding_attention")
        where = "rope_parameters.full_attention", "rope_parameters.sliding_attention"
    else:
        if params:
            raise ConversionError(f"config.json rope_parameters={params!r}: Gemma-3 has one per layer type "
                                  "(full_attention, sliding_attention)")
        global_params = {"rope_theta": config["rope_theta"], **(config.get("rope_scaling") or {})}
        local_params = {"rope_theta": config["rope_local_base_freq"]}
        where = "rope_theta/rope_scaling", "rope_local_base_freq"
    base, factor = _rope(where[0], global_params)
    fields = {"rotary_base": base, "rope_linear_factor": factor}
    if windowed:
        local_base, local_factor = _rope(where[1], local_params)
        if local_factor is not None:
            raise ConversionError(f"config.json {where[1]}: RoPE scaling of the sliding-window layers is not supported")
        if local_base != base:
            fields["rotary_base_local"] = local_base
    return fields


def derived(config: dict) -> dict:
    fields = gemma2.gemma_fields(config, default_pattern=6)
    return {**rope_fields(config, windowed="sliding_window" in fields), **fields}


FAMILY = register(replace(
    gemma2.FAMILY,
    architectures=("Gemma3ForCausalLM",),
    fixed={**gemma2.FIXED, "qk_layernorm": True},
    derived=derived,
    hf_defaults=HF_DEFAULTS,
    examples={
        # A non-alternating window pattern; RoPE bases far apart (and linear scaling on the global
        # layers), so that a layer rotating with the other one shows.
        "gemma3": ("Gemma3TextConfig", dict(
            head_dim=16, query_pre_attn_scalar=12, sliding_window=4, tie_word_embeddings=True,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})),
    },
))
