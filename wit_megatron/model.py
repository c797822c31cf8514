"""Build a Megatron-Core GPTModel (one chunk per virtual pipeline stage) from a small architecture record.

The record (GPTArch) holds sizes and the choices that set families apart (activation, norm weighting,
post-norms, embedding multiplier, soft-capping, sliding windows, RoPE bases); the checkpoint converters
store it next to the weights, so training, conversion and verification build the same model and never
re-type architecture flags. What megatron-core lacks for some choices comes from `wit_megatron.layers`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from wit_megatron.runtime import cpu
from wit_megatron.runtime.parallel import ParallelLayout

LayerSpec = Literal["auto", "te", "local"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' "gelu_pytorch_tanh")."""
    return F.gelu(x, approximate="tanh")


# GPTArch.activation -> the gated MLP's activation function.
ACTIVATION_FUNCTIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


@dataclass(frozen=True)
class GPTArch:
    """A decoder-only transformer with RoPE and grouped-query attention, gated MLP and RMSNorm; the defaults
    of the fields after `kv_replicas` give a Llama-style decoder, other values Gemma-2/3's choices."""

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # what megatron-core builds: the HF KV heads x kv_replicas
    ffn_hidden_size: int
    max_position_embeddings: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    kv_channels: Optional[int] = None  # head dim, if not hidden_size / num_attention_heads
    add_bias_linear: bool = False  # biases on every linear layer (QKV, proj, fc1, fc2)
    # Llama 3.x RoPE scaling (megatron-core fixes low/high freq factors 1/4 and original context 8192).
    rope_scaling_factor: Optional[float] = None
    # The tokenizer's vocabulary when `vocab_size` includes padding rows (converters strip them on export).
    unpadded_vocab_size: Optional[int] = None
    # Copies of each HF KV head (consecutive query groups), so that TP can exceed the HF KV heads.
    # Exact only while the copies stay identical: wit_megatron.training.step sums their gradients.
    kv_replicas: int = 1
    # The gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh-approximated GELU).
    activation: str = "silu"
    # RMSNorms scale by (1 + w): weights are stored around 0 (Gemma; megatron-core's layernorm_zero_centered_gamma).
    norm_weight_plus_one: bool = False
    # An RMSNorm on the attention output and on the MLP output as well, before each residual add (Gemma-2/3).
    post_norms: bool = False
    # Word embeddings times this value, rounded to their dtype (Gemma: sqrt(hidden_size)); the output matrix is not scaled.
    embedding_multiplier: Optional[float] = None
    # Attention scores' scale if not 1/sqrt(head dim) (Gemma: 1/sqrt(query_pre_attn_scalar)).
    softmax_scale: Optional[float] = None
    # Soft-capping cap·tanh(x / cap) of the attention scores and of the output logits (Gemma-2).
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # Sliding-window attention: a query sees itself and the sliding_window - 1 tokens before it (HF's
    # `sliding_window`), on the layers `window_layers` marks (None: every layer).
    sliding_window: Optional[int] = None
    window_layers: Optional[tuple[bool, ...]] = None
    # RoPE base of the sliding-window layers, where it is not `rotary_base` (Gemma-3's local layers).
    rotary_base_local: Optional[float] = None
    # Linear RoPE scaling (positions / factor) of the layers with the global base (Gemma-3's rope_scaling).
    rope_linear_factor: Optional[float] = None

    def __post_init__(self):
        if self.activation not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATION_FUNCTIONS)}")
        for name in ("embedding_multiplier", "softmax_scale", "attn_logit_softcapping", "final_logit_softcapping",
                     "sliding_window", "rotary_base_local", "rope_linear_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.window_layers is not None:
            if self.sliding_window is None or len(self.window_layers) != self.num_layers:
                raise ValueError(f"window_layers needs sliding_window and one entry per layer ({self.num_layers}), "
                                 f"got {len(self.window_layers)} with sliding_window={self.sliding_window}")
            object.__setattr__(self, "window_layers", tuple(bool(w) for w in self.window_layers))  # JSON gives a list
        if self.rotary_base_local is not None and self.sliding_window is None:
            raise ValueError("rotary_base_local is the RoPE base of sliding-window layers: it needs sliding_window")
        if self.post_norms and self.add_bias_linear:
            raise ValueError("post_norms with add_bias_linear: the output projections' bias would come after the post-norm")

    @property
    def hf_kv_heads(self) -> int:
        """The KV heads of the HF model (each held `kv_replicas` times in Megatron's query groups)."""
        return self.num_query_groups // self.kv_replicas

    @property
    def tokenizer_vocab_size(self) -> int:
        """The vocabulary without padding rows (the HF model's)."""
        return self.unpadded_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTArch":
        return cls(**d)


class LayoutError(ValueError):
    """A parallel layout the model cannot be split into."""


def check_layout(arch: GPTArch, layout: ParallelLayout) -> None:
    """Refuse a layout the model cannot be split into (LayoutError), naming the sizes that would work."""

    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    heads, groups, kv_heads, ffn = arch.num_attention_heads, arch.num_query_groups, arch.hf_kv_heads, arch.ffn_hidden_size
    # megatron-core splits the heads, the query groups and the MLP's intermediate rows over TP.
    valid_tp = [d for d in divisors(heads) if groups % d == 0 and ffn % d == 0]
    if layout.tp not in valid_tp:
        held = f"{groups} KV heads"
        if arch.kv_replicas > 1:
            held = f"{groups} query groups ({kv_heads} KV heads x {arch.kv_replicas} replicas)"
        if heads % layout.tp == 0 and groups % layout.tp == 0:  # only the MLP is in the way
            raise LayoutError(
                f"tensor-parallel size {layout.tp} does not divide ffn_hidden_size {ffn} (the MLP's intermediate size); "
                f"valid sizes: {valid_tp} (those dividing the {heads} attention heads, {held} and ffn_hidden_size {ffn})"
            )
        message = f"tensor-parallel size {layout.tp} does not divide the {heads} attention heads and {held}; valid sizes: {valid_tp}"
        if heads % layout.tp == 0 and ffn % layout.tp == 0:  # KV-head copies make it valid: the fewest are lcm(tp, KV heads) / KV heads
            replicas = layout.tp // math.gcd(layout.tp, kv_heads)
            message += (f". To run at TP {layout.tp}, convert the HF model with --kv-replicas {replicas} "
                        f"({kv_heads} KV heads x {replicas} identical copies = {kv_heads * replicas} query groups)")
        raise LayoutError(message)
    stages = layout.pp * (layout.vpp or 1)
    if arch.num_layers % stages:
        raise LayoutError(
            f"{arch.num_layers} layers cannot be split into pp*vpp = {stages} stages; "
            f"valid pp*vpp: {divisors(arch.num_layers)}"
        )


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(arch: GPTArch, layout: ParallelLayout, dtype: torch.dtype = torch.float32, **overrides):
    """The TransformerConfig (`layers.config.ExtendedTransformerConfig`) for `arch` at `layout`, set up for
    WIT's per-token loss normalization."""
    from wit_megatron.layers.config import ExtendedTransformerConfig

    windows = None
    if arch.sliding_window is not None and arch.window_layers is not None:
        windows = [int(w) for w in arch.window_layers]  # megatron-core's per-layer list: 1 = sliding window
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        layernorm_zero_centered_gamma=arch.norm_weight_plus_one,
        add_qkv_bias=arch.add_qkv_bias,
        add_bias_linear=arch.add_bias_linear,
        qk_layernorm=arch.qk_layernorm,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=ACTIVATION_FUNCTIONS[arch.activation],
        softmax_scale=arch.softmax_scale,
        # megatron-core's window (left, 0): a query sees the `left` tokens before it and itself.
        window_size=None if arch.sliding_window is None else (arch.sliding_window - 1, 0),
        window_attn_skip_freq=windows,
        attn_logit_softcapping=arch.attn_logit_softcapping,
        final_logit_softcapping=arch.final_logit_softcapping,
        embedding_multiplier=arch.embedding_multiplier,
        rotary_base_local=arch.rotary_base_local,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        calculate_per_token_loss=True,  # WIT: Σ w·NLL / N over the global batch
        use_cpu_initialization=not torch.cuda.is_available(),
        persist_layer_norm=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    fields.update(cpu.config_overrides())
    fields.update(overrides)
    return ExtendedTransformerConfig(**fields)


def resolve_layer_spec(kind: LayerSpec) -> str:
    """"te" or "local" for `kind`; "auto": TE's on GPUs with TE installed, the local spec otherwise."""
    if kind == "auto":
        return "te" if transformer_engine_available() else "local"
    if kind not in ("te", "local"):
        raise ValueError(f"layer spec {kind!r}: choose auto, te or local")
    if kind == "te" and not transformer_engine_available():
        raise RuntimeError("the Transformer Engine layer spec needs a GPU and transformer-engine installed; use the local spec")
    return kind


def layer_spec(arch: GPTArch, kind: LayerSpec = "auto"):
    """The transformer layer's spec of `kind` ("te": Transformer Engine, "local": torch, "auto"):
    megatron-core's, with `wit_megatron.layers` modules where `arch` needs what megatron-core's lack."""
    import copy

    from megatron.core.models.gpt import gpt_layer_specs as specs

    from wit_megatron.layers import attention, norm
    from wit_megatron.runtime import compat

    kind = resolve_layer_spec(kind)
    if kind == "te":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    else:
        spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec = copy.deepcopy(spec)  # its submodules are edited below
    layer, attn = spec.submodules, spec.submodules.self_attention
    if kind == "local" and arch.norm_weight_plus_one:  # torch's RMSNorm has no (1 + w); TE's norms have
        layer.input_layernorm = layer.pre_mlp_layernorm = norm.RMSNorm
        if arch.qk_layernorm:
            attn.submodules.q_layernorm = attn.submodules.k_layernorm = norm.RMSNorm
    # Soft-capped scores need our attention everywhere; sliding windows on the local spec (TE does them).
    if arch.attn_logit_softcapping is not None or (kind == "local" and arch.sliding_window is not None):
        attn.submodules.core_attention = attention.CoreAttention
    if arch.rotary_base_local is not None:
        attn.module = attention.SelfAttentionWithLocalRope
    if arch.post_norms:
        post = _norm_class(kind)
        attn.submodules.linear_proj = norm.with_post_norm(attn.submodules.linear_proj, post)
        mlp = compat.mlp_submodules(spec.submodules.mlp)
        mlp.linear_fc2 = norm.with_post_norm(mlp.linear_fc2, post)
    return spec


def _norm_class(kind: str) -> type:
    """The RMSNorm this project builds on its own for spec `kind` (post-norms, final norm with 1 + w)."""
    if kind == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from wit_megatron.layers.norm import RMSNorm

    return RMSNorm


def preferred_layer_spec(preference: Optional[str]) -> LayerSpec:
    """The spec ("te" or "local") to build for a converter's recorded `--layer-spec` or a training
    flag: "local" is always honoured; "te" (the converters' default, also for None) gives TE's spec
    where TE and a GPU are present and the local spec elsewhere (CPU)."""
    if preference not in (None, "te", "local"):
        raise ValueError(f"layer spec {preference!r}: choose te or local")
    if preference == "local" or not transformer_engine_available():
        return "local"
    return "te"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def build_model(arch: GPTArch, config, kind: LayerSpec = "auto", spec=None) -> list[torch.nn.Module]:
    """GPTModel chunks (`layers.gpt.ExtendedGPTModel`) for this rank, one per virtual pipeline stage, with
    the layer spec of `kind` (see `layer_spec`), or `spec` where given (a spec of kind `kind` built
    elsewhere: the tests' context-parallel attention). Process groups must exist."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from wit_megatron.layers.gpt import ExtendedGPTModel

    kind = resolve_layer_spec(kind)
    spec = spec or layer_spec(arch, kind)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        decoder = spec
        if arch.norm_weight_plus_one:  # megatron-core's default final norm would be torch's, without (1 + w)
            decoder = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=stage),
                                                 layer_norm=_norm_class(kind))
        chunks.append(
            ExtendedGPTModel(
                config=config,
                transformer_layer_spec=decoder,
                vocab_size=arch.vocab_size,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
                share_embeddings_and_output_weights=arch.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=_rope_base(arch.rotary_base),
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                seq_len_interpolation_factor=arch.rope_linear_factor,
                vp_stage=stage,
            )
        )
    return chunks


def _rope_base(base: float):
    return int(base) if float(base).is_integer() else base
