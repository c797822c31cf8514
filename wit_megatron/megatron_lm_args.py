"""What Megatron-LM is told about a checkpoint of this project.

`megatron_lm_args` is the `args` namespace stored in the common state, as Megatron-LM's own save stores
it. `megatron_lm_flags` gives the `pretrain_gpt.py` arguments that describe the model, written next to the
checkpoint as `megatron_lm_flags.txt`. Megatron-LM's `--use-checkpoint-args` is not enough on its own:
its `load_args_from_checkpoint` restores layers, sizes, heads, RoPE base, biases and tying, but not
`norm_epsilon`, `qk_layernorm`, `use_rope_scaling` or `rope_scaling_factor`, so a Qwen3 model loads
without its q/k norms and a Llama-3.1 model without its RoPE scaling, silently (logits off by 0.7 and
1.5e-3 on the test models). And one setting no flag can carry: Megatron-LM's pretrain_gpt.py parses
`--rope-scaling-factor` but never passes it to GPTModel (core_v0.16.1 to core_v0.19.0), which keeps
its default 8.0; `megatron_lm_caveats` names it for the converter to print.

Some architectures have parts no `pretrain_gpt.py` option builds (Gemma-2/3: soft-capping, post-norms,
GeGLU with tanh GELU, the embedding multiplier, ...): `megatron_lm_gaps` names them, and the flags file
then starts with `#` lines saying so. Passed as `$(cat megatron_lm_flags.txt)`, those words make
Megatron-LM stop with "unrecognized arguments" instead of building a different model from the weights.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import math
from pathlib import Path

import torch

from wit_megatron.model import GPTArch
from wit_megatron.runtime.parallel import ParallelLayout

FLAGS_FILE = "megatron_lm_flags.txt"
GPT_MODEL_ROPE_SCALING_FACTOR = 8.0  # GPTModel's default: the factor Megatron-LM's pretrain_gpt.py builds with


def _head_dim(arch: GPTArch) -> int:
    return arch.kv_channels or arch.hidden_size // arch.num_attention_heads


# Megatron-LM's argument parser's defaults, for where the installed megatron-core ships no `megatron.training`
# (0.16): taken from megatron-core 0.19.2's by `python -m wit_megatron.megatron_lm_args --write-defaults`.
PARSER_DEFAULTS = Path(__file__).with_name("megatron_lm_parser_defaults.json")
# The non-JSON default values of that parser, by type: written as {"enum": type, "name": member}.
_ENUMS = {"AttnBackend": ("megatron.core.transformer.enums", "AttnBackend"), "Signals": ("signal", "Signals")}


def parser_defaults() -> dict:
    """Every option of Megatron-LM's argument parser with its default value: from the installed
    `megatron.training` (megatron-core 0.17+), else from PARSER_DEFAULTS."""
    from wit_megatron.runtime.compat import ships_megatron_training

    if ships_megatron_training():
        from megatron.training.arguments import add_megatron_arguments

        return vars(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args([]))
    defaults = json.loads(PARSER_DEFAULTS.read_text())["defaults"]
    return {name: _decode(value) for name, value in defaults.items()}


def _encode(value):
    if isinstance(value, enum.Enum):
        return {"enum": type(value).__name__, "name": value.name}
    return value


def _decode(value):
    if isinstance(value, dict) and set(value) == {"enum", "name"}:
        module, name = _ENUMS[value["enum"]]
        return getattr(getattr(importlib.import_module(module), name), value["name"])
    return value


def megatron_lm_args(arch: GPTArch, dtype: torch.dtype, layout: ParallelLayout = ParallelLayout(),
                     world_size: int = 1) -> argparse.Namespace:
    """The `args` Megatron-LM stores in a checkpoint, as its own save stores them: every option of its
    argument parser (`parser_defaults`), with the model's architecture and dtype, and the layout the
    checkpoint was saved at (a converted checkpoint: one rank). Megatron-LM's `--use-checkpoint-args`
    and Megatron-Bridge's Megatron-LM checkpoint reader read them."""
    model = vars(_model_args(arch, dtype, layout, world_size))
    # Megatron-LM's parser keeps --norm-epsilon and --apply-layernorm-1p under other names (0.19: these).
    model.update(layernorm_epsilon=model["norm_epsilon"], layernorm_zero_centered_gamma=model["apply_layernorm_1p"],
                 make_vocab_size_divisible_by=vocab_divisor(arch))
    return argparse.Namespace(**{**parser_defaults(), **model})


def _model_args(arch: GPTArch, dtype: torch.dtype, layout: ParallelLayout, world_size: int) -> argparse.Namespace:
    """The options that describe the model, its dtype and layout, as Megatron-LM's validate_args leaves them."""
    windows = None
    if arch.sliding_window is not None and arch.window_layers is not None:
        windows = [int(w) for w in arch.window_layers]
    linear_rope = arch.rope_linear_factor
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=_head_dim(arch),
        max_position_embeddings=arch.max_position_embeddings, seq_length=arch.max_position_embeddings,
        position_embedding_type="rope", rotary_base=arch.rotary_base, rotary_percent=1.0,
        use_rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or GPT_MODEL_ROPE_SCALING_FACTOR,
        rotary_seq_len_interpolation_factor=int(linear_rope) if linear_rope and float(linear_rope).is_integer() else None,
        normalization="RMSNorm", norm_epsilon=arch.norm_epsilon, apply_layernorm_1p=arch.norm_weight_plus_one,
        swiglu=arch.activation == "silu",
        window_size=None if arch.sliding_window is None else (arch.sliding_window - 1, 0), window_attn_skip_freq=windows,
        untie_embeddings_and_output_weights=not arch.tie_embeddings, add_qkv_bias=arch.add_qkv_bias or arch.add_bias_linear,
        add_bias_linear=arch.add_bias_linear, qk_layernorm=arch.qk_layernorm,
        padded_vocab_size=arch.vocab_size, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp, world_size=world_size,
        data_parallel_size=layout.data_parallel_size(world_size), ckpt_format="torch_dist",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )


def vocab_divisor(arch: GPTArch) -> int:
    """The smallest `--make-vocab-size-divisible-by` with which Megatron-LM's rule (the tokenizer's size rounded
    up to a multiple of it x TP) gives the checkpoint's rows at TP 1: 1 without padding rows."""
    vocab, rows = arch.tokenizer_vocab_size, arch.vocab_size
    return next(d for d in range(1, rows + 1) if rows % d == 0 and -(-vocab // d) * d == rows)


def megatron_lm_gaps(arch: GPTArch) -> list[str]:
    """The parts of `arch` stock Megatron-LM (`pretrain_gpt.py`) has no option for, one phrase each (no
    word starts with "--": Megatron-LM's parser would take it for an option)."""
    gaps = []
    if arch.activation == "gelu_tanh":
        gaps.append("a GeGLU MLP with tanh-approximated GELU (its swiglu option is SiLU, its quick-geglu another function)")
    if arch.post_norms:
        gaps.append("an RMSNorm after attention and after the MLP (post-norms)")
    if arch.embedding_multiplier is not None:
        gaps.append(f"word embeddings multiplied by {arch.embedding_multiplier:g} (sqrt(hidden_size), in their dtype)")
    if arch.softmax_scale is not None and not math.isclose(arch.softmax_scale, _head_dim(arch) ** -0.5, rel_tol=1e-12):
        gaps.append(f"the attention softmax scale {arch.softmax_scale:g} (Megatron-LM uses 1/sqrt(kv_channels))")
    if arch.attn_logit_softcapping is not None:
        gaps.append(f"attention-score soft-capping {arch.attn_logit_softcapping:g}·tanh(score/{arch.attn_logit_softcapping:g})")
    if arch.final_logit_softcapping is not None:
        gaps.append(f"final-logit soft-capping {arch.final_logit_softcapping:g}·tanh(logit/{arch.final_logit_softcapping:g}), "
                    "also in the loss")
    if arch.rotary_base_local is not None:
        gaps.append(f"a RoPE base of its own ({arch.rotary_base_local:g}) for the sliding-window layers")
    if arch.rope_linear_factor is not None and not float(arch.rope_linear_factor).is_integer():
        gaps.append(f"linear RoPE scaling by {arch.rope_linear_factor:g} (its rotary-seq-len-interpolation-factor takes integers)")
    return gaps


# The stored `args` that describe the model, as pretrain_gpt.py options: valued ones, then switches.
_VALUED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
           "max_position_embeddings", "position_embedding_type", "rotary_base", "rotary_percent", "rope_scaling_factor",
           "rotary_seq_len_interpolation_factor", "normalization", "norm_epsilon", "window_size", "window_attn_skip_freq",
           "ckpt_format")
_SWITCHES = ("group_query_attention", "use_rope_scaling", "swiglu", "apply_layernorm_1p", "add_qkv_bias", "qk_layernorm",
             "untie_embeddings_and_output_weights")


def megatron_lm_flags(arch: GPTArch) -> list[str]:
    """`pretrain_gpt.py` arguments for the model `arch` describes: the stored `args` (megatron_lm_args)
    written as options, so the two never disagree (options left at None are not written).

    The vocabulary flag assumes Megatron-LM's tokenizer has `arch.tokenizer_vocab_size` ids (its padded
    size is computed from the tokenizer, `--make-vocab-size-divisible-by` x TP): with no padding rows,
    divisible-by 1 gives the checkpoint's rows at every TP the converter allows. Padded rows depend on
    TP in Megatron-LM's rule, so for a padded checkpoint the flag is left to the user (docs/convert.md).
    """
    args = vars(_model_args(arch, torch.float32, ParallelLayout(), 1))
    flags = []
    for name in _VALUED:
        if args[name] is not None:
            flags += [_option(name), _value(name, args[name])]
    flags += [_option(name) for name in _SWITCHES if args[name]]
    if not args["add_bias_linear"]:
        flags.append("--disable-bias-linear")
    if arch.vocab_size == arch.tokenizer_vocab_size:
        flags += ["--make-vocab-size-divisible-by", "1"]
    return flags


def megatron_lm_caveats(arch: GPTArch) -> list[str]:
    """What Megatron-LM's pretrain_gpt.py builds differently from `arch` even with the flags file."""
    factor = arch.rope_scaling_factor
    if factor is None or factor == GPT_MODEL_ROPE_SCALING_FACTOR:
        return []
    return [f"RoPE scaling factor {factor}: Megatron-LM's pretrain_gpt.py (megatron-core 0.16 to 0.19) parses "
            f"--rope-scaling-factor but does not pass it to GPTModel, which then scales by {GPT_MODEL_ROPE_SCALING_FACTOR}; "
            f"this checkpoint trains with the wrong RoPE there unless its model builder passes "
            f"rope_scaling_factor=args.rope_scaling_factor (examples/pretrain_wit.py builds it with {factor})"]


def flags_file_text(arch: GPTArch) -> str:
    """megatron_lm_flags.txt: the flags on one line, after `#` lines naming what Megatron-LM cannot build."""
    gaps = megatron_lm_gaps(arch)
    lines = []
    if gaps:
        lines.append("# Stock Megatron-LM (pretrain_gpt.py) cannot build this model: it has no option for")
        lines += [f"#   - {gap}" for gap in gaps]
        lines.append("# The flags below describe the rest; with them alone Megatron-LM would build a different model")
        lines.append("# (these # lines make it stop instead). A model provider with the parts above can use them:")
        lines.append("# grep -v '^#' megatron_lm_flags.txt")
    lines.append(" ".join(megatron_lm_flags(arch)))
    return "\n".join(lines) + "\n"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value(name: str, value) -> str:
    if name == "rotary_base" and float(value).is_integer():
        return str(int(value))  # Megatron-LM parses it as an int (a fractional base stays fractional, and is refused there)
    if name == "window_size":
        return ",".join(str(v) for v in value)  # Megatron-LM's tuple_type: "left,right"
    if name == "window_attn_skip_freq":
        return "[" + ",".join(str(v) for v in value) + "]"  # its pattern type evaluates a list expression
    return repr(value) if isinstance(value, float) else str(value)


def _write_defaults() -> None:
    """Rewrite PARSER_DEFAULTS from the installed megatron.training's parser (megatron-core 0.17+)."""
    from importlib.metadata import version

    defaults = {name: _encode(value) for name, value in sorted(parser_defaults().items())}
    PARSER_DEFAULTS.write_text(json.dumps({"megatron_core": version("megatron-core"), "defaults": defaults}, indent=1) + "\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-defaults"]:
        sys.exit(f"usage: python -m wit_megatron.megatron_lm_args --write-defaults  (rewrites {PARSER_DEFAULTS.name})")
    _write_defaults()
