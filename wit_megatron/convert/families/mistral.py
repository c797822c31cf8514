"""Mistral (MistralForCausalLM): Llama's tensors; sliding-window attention is refused."""

from dataclasses import replace

from wit_megatron.convert.families import Refusal, llama, register

FAMILY = register(replace(
    llama.FAMILY,
    architectures=("MistralForCausalLM",),
    fixed={},
    refusals=(
        llama.REFUSALS[0],
        Refusal("sliding_window", lambda v, c: v is None or v >= c.get("max_position_embeddings", 0),
                "sliding-window attention is not represented in this converter's Megatron model; "
                "a window shorter than max_position_embeddings would drift"),
    ),
    examples={"mistral": ("MistralConfig", dict(sliding_window=None, head_dim=8))},
))
