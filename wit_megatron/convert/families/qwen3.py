"""Qwen3 (Qwen3ForCausalLM): Llama's tensors plus per-head RMSNorm on queries and keys."""

from dataclasses import replace

from wit_megatron.convert.families import llama, qwen2

FAMILY = replace(
    llama.FAMILY,
    architectures=("Qwen3ForCausalLM",),
    fixed={"qk_layernorm": True, "add_bias_linear": "attention_bias"},
    refusals=(llama.REFUSALS[0], qwen2.SLIDING_WINDOW, llama.REFUSALS[1]),
)
