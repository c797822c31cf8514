"""Llama 2 / 3 / 3.1 / 3.2 (LlamaForCausalLM): the base table the other families extend."""

from wit_megatron.convert.families import Family, HFFlag, Refusal, Rule, register
from wit_megatron.convert.transforms import GATE_UP, QKV, VOCAB

L = "model.layers.{i}."

RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",),
         local="decoder.layers.{i}.input_layernorm.weight"),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"), QKV),
    Rule("decoder.layers.self_attention.linear_qkv.bias",
         (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"), QKV,
         when="qkv_bias"),
    Rule("decoder.layers.self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), when="qk_norm"),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), when="qk_norm"),
    Rule("decoder.layers.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",)),
    Rule("decoder.layers.self_attention.linear_proj.bias", (L + "self_attn.o_proj.bias",), when="linear_bias"),
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",),
         local="decoder.layers.{i}.pre_mlp_layernorm.weight"),
    Rule("decoder.layers.mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.mlp.linear_fc1.bias", (L + "mlp.gate_proj.bias", L + "mlp.up_proj.bias"), GATE_UP,
         when="linear_bias"),
    Rule("decoder.layers.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",)),
    Rule("decoder.layers.mlp.linear_fc2.bias", (L + "mlp.down_proj.bias",), when="linear_bias"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)

CONFIG = {
    "vocab_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "norm_epsilon": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "kv_channels": "head_dim",
}

REFUSALS = (
    Refusal("hidden_act", lambda v, c: v in (None, "silu"), "Megatron-Core's gated MLP here is SwiGLU (silu)"),
    Refusal("attention_bias", lambda v, c: bool(v) == bool(c.get("mlp_bias")),
            "Megatron-Core has one switch (add_bias_linear) for attention-output and MLP biases: "
            "attention_bias and mlp_bias must be equal"),
    Refusal("pretraining_tp", lambda v, c: v in (None, 1), "pretraining_tp > 1 changes the numerics"),
)

# Llama-3.2's RoPE scaling (factor 32; Llama-3.1's 8.0 is also megatron-core's default, which would hide a dropped factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

FAMILY = register(Family(
    architectures=("LlamaForCausalLM",),
    rules=RULES,
    config=CONFIG,
    fixed={"add_bias_linear": HFFlag("attention_bias")},
    refusals=REFUSALS,
    examples={
        "llama_gqa_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
        "llama3_rope_scaling": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=16384)),
        "llama_mqa_biases": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
        "llama_gqa8_kv2": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    },
))
