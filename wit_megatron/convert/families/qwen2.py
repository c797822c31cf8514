"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's tensors plus a QKV bias (no output-projection bias)."""

from dataclasses import replace

from wit_megatron.convert.families import Refusal, llama, register

SLIDING_WINDOW = Refusal("use_sliding_window", lambda v, c: not v,
                         "sliding-window attention is not represented in this converter's Megatron model")

FAMILY = register(replace(
    llama.FAMILY,
    architectures=("Qwen2ForCausalLM",),
    fixed={"add_qkv_bias": True},
    refusals=(llama.REFUSALS[0], SLIDING_WINDOW),
    examples={"qwen2_qkv_bias_tied": ("Qwen2Config", dict(tie_word_embeddings=True))},
))
