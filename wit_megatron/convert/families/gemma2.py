"""Gemma-2 (Gemma2ForCausalLM), and the Gemma parts gemma3.py reuses.

Beyond Llama's tensors (names differ: HF's `post_attention_layernorm` is Gemma's norm after attention,
`pre_feedforward_layernorm` the one before the MLP), a Gemma decoder has, all as GPTArch fields:
GeGLU with tanh-approximated GELU; RMSNorms scaling by (1 + w); a norm after attention and after the MLP
as well as before (`post_norms`); embeddings times √hidden; scores scaled by 1/√query_pre_attn_scalar;
soft-capped attention scores and output logits (Gemma-2); sliding-window attention on the layers
`layer_types` marks (Gemma-2: every other layer, the first one windowed).
"""

from wit_megatron.convert.families import Family, Refusal, Rule, llama, register, uniform_rope
from wit_megatron.convert.hf_config import number
from wit_megatron.convert.transforms import GATE_UP, QKV, VOCAB, ConversionError

L = "model.layers.{i}."

RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",),
         local="decoder.layers.{i}.input_layernorm.weight"),
    Rule("decoder.layers.self_attention.linear_qkv.weight",
         (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"), QKV),
    Rule("decoder.layers.self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), when="qk_norm"),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), when="qk_norm"),
    Rule("decoder.layers.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",)),
    Rule("decoder.layers.self_attention.linear_proj.post_layernorm.weight", (L + "post_attention_layernorm.weight",)),
    Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (L + "pre_feedforward_layernorm.weight",),
         local="decoder.layers.{i}.pre_mlp_layernorm.weight"),
    Rule("decoder.layers.mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",)),
    Rule("decoder.layers.mlp.linear_fc2.post_layernorm.weight", (L + "post_feedforward_layernorm.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when="untied"),
)

CONFIG = {
    **llama.CONFIG,
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}

# Gemma's choices: GeGLU (tanh GELU), (1 + w) RMSNorms, norms after attention and MLP too.
FIXED = {"activation": "gelu_tanh", "norm_weight_plus_one": True, "post_norms": True}

REFUSALS = (
    Refusal("hidden_activation", lambda v, c: v == "gelu_pytorch_tanh",
            "Gemma's MLP here is GeGLU with transformers' gelu_pytorch_tanh"),
    Refusal("attention_bias", lambda v, c: not v, "Gemma with attention biases has no Megatron-Core counterpart "
            "(its o_proj bias would need MLP biases too, and come after the post-attention norm)"),
    Refusal("use_bidirectional_attention", lambda v, c: not v,
            "bidirectional attention: Megatron-Core's GPTModel is causal"),
    llama.REFUSALS[2],  # pretraining_tp
)

# Gemma2Config's defaults for the keys that change the computation, where config.json omits them.
HF_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0}

LAYER_TYPES = ("sliding_attention", "full_attention")


def window_layers(config: dict, default_pattern: int) -> tuple[bool, ...]:
    """Which layers attend through the sliding window: config.json's `layer_types`, or, in configs written
    before transformers had it, every layer but each `sliding_window_pattern`-th (transformers' rule)."""
    layers = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types is None:
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", default_pattern))
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ConversionError(f"config.json sliding_window_pattern={pattern!r}: expected a positive integer")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ConversionError(f"config.json layer_types={types!r}: expected {layers} entries (num_hidden_layers), "
                              f"each one of {', '.join(LAYER_TYPES)}")
    return tuple(t == "sliding_attention" for t in types)


def gemma_fields(config: dict, default_pattern: int) -> dict:
    """The Gemma GPTArch fields computed from the config: embedding multiplier, softmax scale, windows."""
    fields = {
        "embedding_multiplier": config["hidden_size"] ** 0.5,  # transformers: hidden_size**0.5, in the embedding dtype
        "softmax_scale": number("query_pre_attn_scalar", config["query_pre_attn_scalar"]) ** -0.5,
    }
    windows = window_layers(config, default_pattern)
    if any(windows):
        window = config.get("sliding_window")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConversionError(f"config.json sliding_window={window!r}: expected a positive integer (layers "
                                  f"{[i for i, w in enumerate(windows) if w]} attend through the window)")
        fields.update(sliding_window=window, window_layers=windows)
    return fields


def derived(config: dict) -> dict:
    return {**uniform_rope(config), **gemma_fields(config, default_pattern=2)}


FAMILY = register(Family(
    architectures=("Gemma2ForCausalLM",),
    rules=RULES,
    config=CONFIG,
    fixed=FIXED,
    refusals=REFUSALS,
    derived=derived,
    hf_defaults=HF_DEFAULTS,
    examples={
        # Caps small enough to bite on this model's scores and logits; the test sequences are longer
        # than the window; query_pre_attn_scalar is not the head dim.
        "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=1.5,
                                        final_logit_softcapping=1.0, tie_word_embeddings=True)),
    },
))
