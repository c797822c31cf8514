"""Gemma-2/3 configs as published on the Hugging Face Hub (written before transformers had `layer_types`
or per-layer-type RoPE, and omitting keys that have defaults) give the architecture transformers reads
from them; what Megatron-Core cannot represent is refused naming the key. (The tiny random Gemma models'
round trips and logits are in test_convert_families.py with every other family's.)"""

from __future__ import annotations

import json

import pytest
import torch

from wit_megatron.convert.families import family_for
from wit_megatron.convert.hf_config import arch_from_hf_config
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.layers.softcap import final_logit_softcap
from wit_megatron.model import GPTArch

# google/gemma-2-2b and google/gemma-3-1b-it config.json (transformers 4.42 / 4.50), and the text part of
# google/gemma-3-4b-it's (linear RoPE scaling on the global layers).
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": 50.0,
    "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True,
    "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
    "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106], "final_logit_softcapping": None,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
    "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
    "vocab_size": 262144,
}
GEMMA3_4B_TEXT = {**GEMMA3_1B, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "num_hidden_layers": 34, "sliding_window": 1024, "vocab_size": 262208,
                  "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}


def transformers_reading(config: dict):
    import transformers

    classes = {"Gemma2ForCausalLM": transformers.Gemma2Config, "Gemma3ForCausalLM": transformers.Gemma3TextConfig}
    return classes[config["architectures"][0]].from_dict(dict(config))


def arch_of(config: dict) -> GPTArch:
    return arch_from_hf_config(family_for(config)[1], config)


def expected_arch(config: dict) -> dict:
    """The GPTArch fields transformers' reading of `config` implies."""
    hf = transformers_reading(config)
    windows = tuple(t == "sliding_attention" for t in hf.layer_types)
    rope = hf.rope_parameters
    per_type = "full_attention" in rope
    global_rope = rope["full_attention"] if per_type else rope
    local_base = rope["sliding_attention"]["rope_theta"] if per_type else global_rope["rope_theta"]
    return dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim, norm_epsilon=hf.rms_norm_eps, tie_embeddings=hf.tie_word_embeddings,
        attn_logit_softcapping=hf.attn_logit_softcapping, final_logit_softcapping=hf.final_logit_softcapping,
        softmax_scale=hf.query_pre_attn_scalar ** -0.5, embedding_multiplier=hf.hidden_size ** 0.5,
        sliding_window=hf.sliding_window, window_layers=windows, rotary_base=global_rope["rope_theta"],
        rotary_base_local=None if local_base == global_rope["rope_theta"] else local_base,
        rope_linear_factor=global_rope.get("factor") if global_rope.get("rope_type") == "linear" else None,
        activation="gelu_tanh", norm_weight_plus_one=True, post_norms=True,
        qk_layernorm=config["architectures"] == ["Gemma3ForCausalLM"],
    )


# Without the keys whose defaults transformers' config classes supply.
DEFAULTED = ("head_dim", "rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
             "sliding_window", "tie_word_embeddings", "rope_theta", "rope_local_base_freq", "sliding_window_pattern")


@pytest.mark.parametrize("name,config", [("gemma-2-2b", GEMMA2_2B), ("gemma-3-1b", GEMMA3_1B), ("gemma-3-4b text", GEMMA3_4B_TEXT),
                                         ("gemma-2-2b, defaults", {k: v for k, v in GEMMA2_2B.items() if k not in DEFAULTED}),
                                         ("gemma-3-1b, defaults", {k: v for k, v in GEMMA3_1B.items() if k not in DEFAULTED})])
def test_hub_configs_give_the_architecture_transformers_reads(name, config):
    arch = arch_of(config)
    expected = expected_arch(config)
    assert {field: getattr(arch, field) for field in expected} == expected, name
    assert GPTArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch  # the record keeps it


def test_the_hub_configs_patterns():
    """Spelled out: Gemma-2 windows every other layer from the first; Gemma-3 all but every 6th, with its
    local RoPE base; the 4B's linear scaling on the global layers only."""
    gemma2, gemma3, gemma3_4b = (arch_of(c) for c in (GEMMA2_2B, GEMMA3_1B, GEMMA3_4B_TEXT))
    assert gemma2.window_layers == (True, False) * 13 and gemma2.sliding_window == 4096
    assert gemma2.rotary_base_local is None and gemma2.tie_embeddings
    assert gemma3.window_layers == ((True,) * 5 + (False,)) * 4 + (True, True)
    assert (gemma3.rotary_base, gemma3.rotary_base_local, gemma3.rope_linear_factor) == (1e6, 1e4, None)
    assert (gemma3_4b.rope_linear_factor, gemma3_4b.sliding_window) == (8.0, 1024)


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_activation="gelu"), r"^config.json hidden_activation='gelu': Gemma's MLP here is GeGLU"),
    (dict(attention_bias=True), r"^config.json attention_bias=True: Gemma with attention biases"),
    (dict(use_bidirectional_attention=True), r"^config.json use_bidirectional_attention=True: bidirectional attention"),
    (dict(layer_types=["sliding_attention"] * 25), r"^config.json layer_types=.*expected 26 entries"),
    (dict(layer_types=["chunked_attention"] * 26), r"^config.json layer_types=.*each one of sliding_attention, full_attention"),
    (dict(sliding_window=0), r"^config.json sliding_window=0: expected a positive integer"),
    (dict(final_logit_softcapping=-1.0), r"final_logit_softcapping must be positive, got -1.0"),
    (dict(query_pre_attn_scalar="256"), r"^config.json query_pre_attn_scalar='256': expected a number"),
])
def test_gemma2_configs_megatron_core_cannot_represent_are_refused(changes, message):
    with pytest.raises(ConversionError, match=message):
        arch_of({**GEMMA2_2B, **changes})


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), r"rope type 'yarn' cannot be represented"),
    (dict(rope_parameters={"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                        "rope_theta": 1e4}}),
     r"RoPE scaling of the sliding-window layers is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_theta": 1e6}, "chunked_attention": {"rope_theta": 1e4}}),
     r"settings for unknown layer types \['chunked_attention'\]"),
])
def test_gemma3_ropes_megatron_core_cannot_represent_are_refused(changes, message):
    with pytest.raises(ConversionError, match=message):
        arch_of({**GEMMA3_1B, **changes})


def test_final_logit_softcap_is_the_identity_without_a_cap_and_bounds_logits_with_one():
    logits = torch.tensor([-100.0, -1.0, 0.0, 0.5, 100.0])
    assert final_logit_softcap(logits, None) is logits
    capped = final_logit_softcap(logits, 30.0)
    assert torch.equal(capped, torch.tanh(logits / 30.0) * 30.0) and capped.abs().max() < 30.0
    assert final_logit_softcap(logits.bfloat16(), 30.0).dtype == torch.bfloat16
