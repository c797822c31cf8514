"""Build a Megatron-Core GPTModel (one chunk per virtual pipeline stage) from a small architecture record.

The record holds what a Llama-family decoder needs; the checkpoint converters store it next to the
weights so that training and conversion back never re-type architecture flags.
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


@dataclass(frozen=True)
class GPTArch:
    """A Llama-family decoder: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention."""

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
    """The TransformerConfig for `arch` at `layout`, set up for WIT's per-token loss normalization."""
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        add_qkv_bias=arch.add_qkv_bias,
        add_bias_linear=arch.add_bias_linear,
        qk_layernorm=arch.qk_layernorm,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
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
    return TransformerConfig(**fields)


def layer_spec(arch: GPTArch, kind: LayerSpec = "auto"):
    """megatron-core's layer spec of `kind`: "te" (Transformer Engine), "local" (torch), or "auto":
    TE's on GPUs with TE installed, the local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if kind == "auto":
        kind = "te" if transformer_engine_available() else "local"
    if kind == "te":
        if not transformer_engine_available():
            raise RuntimeError("the Transformer Engine layer spec needs a GPU and transformer-engine installed; use the local spec")
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    if kind != "local":
        raise ValueError(f"layer spec {kind!r}: choose auto, te or local")
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")


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


def build_model(arch: GPTArch, config, spec=None) -> list[torch.nn.Module]:
    """GPTModel chunks for this rank (one per virtual pipeline stage). Process groups must exist."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    spec = spec if spec is not None else layer_spec(arch)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=arch.vocab_size,
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=stage is None, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=stage is None, vp_stage=stage),
                share_embeddings_and_output_weights=arch.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=int(arch.rotary_base) if float(arch.rotary_base).is_integer() else arch.rotary_base,
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                vp_stage=stage,
            )
        )
    return chunks
