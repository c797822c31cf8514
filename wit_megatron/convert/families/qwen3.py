"""Qwen3 (Qwen3ForCausalLM): Llama's tensors plus per-head RMSNorm on queries and keys."""

from dataclasses import replace

from wit_megatron.convert.families import HFFlag, llama, qwen2, register

FAMILY = register(replace(
    llama.FAMILY,
    architectures=("Qwen3ForCausalLM",),
    fixed={"qk_layernorm": True, "add_bias_linear": HFFlag("attention_bias")},
    refusals=(llama.REFUSALS[0], qwen2.SLIDING_WINDOW, llama.REFUSALS[1]),
    examples={"qwen3_qk_norm": ("Qwen3Config", dict(head_dim=16))},
))
