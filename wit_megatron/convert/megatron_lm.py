"""What Megatron-LM is told about a checkpoint of this project.

`megatron_lm_args` is the `args` namespace stored in the common state, as Megatron-LM's own save stores
it. `megatron_lm_flags` gives the `pretrain_gpt.py` arguments that describe the model, written next to the
checkpoint as `megatron_lm_flags.txt`. Megatron-LM's `--use-checkpoint-args` is not enough on its own:
its `load_args_from_checkpoint` restores layers, sizes, heads, RoPE base, biases and tying, but not
`norm_epsilon`, `qk_layernorm`, `use_rope_scaling` or `rope_scaling_factor`, so a Qwen3 model loads
without its q/k norms and a Llama-3.1 model without its RoPE scaling, silently (logits off by 0.7 and
1.5e-3 on the test models).
"""

from __future__ import annotations

import argparse

import torch

from wit_megatron.model import GPTArch
from wit_megatron.runtime.parallel import ParallelLayout

FLAGS_FILE = "megatron_lm_flags.txt"


def megatron_lm_args(arch: GPTArch, dtype: torch.dtype, layout: ParallelLayout = ParallelLayout(),
                     world_size: int = 1) -> argparse.Namespace:
    """The `args` Megatron-LM stores in a checkpoint (read by `--use-checkpoint-args`): the layout is the
    one the checkpoint was saved at (a converted checkpoint: one rank)."""
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.kv_channels or arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings, seq_length=arch.max_position_embeddings,
        position_embedding_type="rope", rotary_base=arch.rotary_base, rotary_percent=1.0,
        use_rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        normalization="RMSNorm", norm_epsilon=arch.norm_epsilon, swiglu=True,
        untie_embeddings_and_output_weights=not arch.tie_embeddings, add_qkv_bias=arch.add_qkv_bias or arch.add_bias_linear,
        add_bias_linear=arch.add_bias_linear, qk_layernorm=arch.qk_layernorm,
        padded_vocab_size=arch.vocab_size, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp, world_size=world_size,
        data_parallel_size=layout.data_parallel_size(world_size), ckpt_format="torch_dist",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )


def megatron_lm_flags(arch: GPTArch) -> list[str]:
    """`pretrain_gpt.py` arguments for the model `arch` describes (architecture and checkpoint format).

    The vocabulary flag assumes Megatron-LM's tokenizer has `arch.tokenizer_vocab_size` ids (its padded
    size is computed from the tokenizer, `--make-vocab-size-divisible-by` x TP): with no padding rows,
    divisible-by 1 gives the checkpoint's rows at every TP the converter allows. Padded rows depend on
    TP in Megatron-LM's rule, so for a padded checkpoint the flag is left to the user (docs/convert.md).
    """
    flags = [
        "--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size),
        "--ffn-hidden-size", str(arch.ffn_hidden_size), "--num-attention-heads", str(arch.num_attention_heads),
        "--max-position-embeddings", str(arch.max_position_embeddings),
        "--position-embedding-type", "rope", "--rotary-base", _integral(arch.rotary_base), "--rotary-percent", "1.0",
        "--normalization", "RMSNorm", "--norm-epsilon", repr(arch.norm_epsilon), "--swiglu",
        "--ckpt-format", "torch_dist",
    ]
    if arch.num_query_groups != arch.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(arch.num_query_groups)]
    if arch.kv_channels is not None:
        flags += ["--kv-channels", str(arch.kv_channels)]
    if arch.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(arch.rope_scaling_factor)]
    if not arch.add_bias_linear:
        flags += ["--disable-bias-linear"]
    if arch.add_qkv_bias or arch.add_bias_linear:
        flags += ["--add-qkv-bias"]
    if arch.qk_layernorm:
        flags += ["--qk-layernorm"]
    if not arch.tie_embeddings:
        flags += ["--untie-embeddings-and-output-weights"]
    if arch.vocab_size == arch.tokenizer_vocab_size:
        flags += ["--make-vocab-size-divisible-by", "1"]
    return flags


def _integral(value: float) -> str:
    """Megatron-LM parses --rotary-base as an int: a fractional base stays fractional, and its parser refuses it."""
    return str(int(value)) if float(value).is_integer() else repr(value)
