"""HF config.json <-> GPTArch, through a family's declarative config table and refusals."""

from __future__ import annotations

import math
import typing
from typing import Optional

from wit_megatron.convert.families import Family, HFFlag
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch

# megatron-core's llama3 RoPE scaling takes only `factor`; these are fixed in RotaryEmbedding._apply_scaling.
MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# What a llama3 scaling must name (transformers' and Meta's llama3 RoPE read all four; none has a default
# that is megatron-core's for certain).
LLAMA3_KEYS = ("factor", *MCORE_LLAMA3_FIXED)


def number(where: str, value) -> float:
    """A config value that must be a number, as float; a ConversionError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"config.json {where}={value!r}: expected a number")
    return float(value)


def rope_settings(config: dict) -> tuple[float, Optional[float]]:
    """(rope theta, llama3 scaling factor or None) from a v4 (`rope_theta`, `rope_scaling`) or v5
    (`rope_parameters`) config; refuses any scaling megatron-core cannot reproduce exactly, and
    missing or wrongly typed values, naming the config.json key."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json rope_parameters={params!r}: expected an object")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(
            f"config.json rope_parameters holds per-layer-type settings ({', '.join(sorted(params))}); "
            "one RoPE for every layer is supported"
        )
    params = dict(params)
    theta = number("rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta",
                    params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    source = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    scaling = config.get("rope_scaling") or params
    if not isinstance(scaling, dict):
        raise ConversionError(f"config.json {source}={scaling!r}: expected an object")
    # transformers v5 keeps partial_rotary_factor in rope_parameters, v4 at the top level.
    for where, holder in (("partial_rotary_factor", config), (f"{source}.partial_rotary_factor", scaling)):
        if holder.get("partial_rotary_factor") is not None and number(where, holder["partial_rotary_factor"]) != 1.0:
            raise ConversionError(
                f"config.json {where}={holder['partial_rotary_factor']} is not supported (only 1.0: RoPE on the whole head)"
            )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json {source}: rope scaling of type {rope_type!r} cannot be represented in Megatron-Core's GPTModel; "
            "supported: none/'default', and 'llama3' with "
            + ", ".join(f"{k}={v:g}" for k, v in MCORE_LLAMA3_FIXED.items())
        )
    missing = [key for key in LLAMA3_KEYS if scaling.get(key) is None]
    if missing:
        raise ConversionError(
            f"config.json {source} of type 'llama3' lacks {', '.join(missing)} (required: {', '.join(LLAMA3_KEYS)})"
        )
    for key, fixed in MCORE_LLAMA3_FIXED.items():
        if number(f"{source}.{key}", scaling[key]) != fixed:
            raise ConversionError(
                f"llama3 rope scaling with {key}={scaling[key]} would drift: megatron-core fixes {key}={fixed:g} "
                f"(only `factor` is configurable; config.json {source})"
            )
    return theta, number(f"{source}.factor", scaling["factor"])


def max_tensor_parallel(num_attention_heads: int, num_query_groups: int, ffn_hidden_size: int) -> int:
    """The largest TP size megatron-core can split these heads and MLP rows into (every valid size divides it)."""
    return math.gcd(num_attention_heads, num_query_groups, ffn_hidden_size)


def padded_vocab_size(vocab: int, max_tp: int, vocab_multiple: Optional[int] = None) -> int:
    """Rows of the Megatron embedding/output matrices: `vocab` rounded up to a multiple of `max_tp`
    (the lcm of the valid TP sizes, which all divide it) and of `vocab_multiple` if given.

    Padding is not free: Megatron-Core does not mask padded vocabulary entries, so their logits (0,
    from the zero rows written here) enter the softmax of every token and the rows get gradients.
    Without padding the training NLL equals the HF model's cross entropy."""
    multiple = math.lcm(max_tp, vocab_multiple or 1)
    return -(-vocab // multiple) * multiple


# GPTArch fields config.json must give.
REQUIRED = ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings")


def field_kinds() -> dict[str, type]:
    """GPTArch field -> the type a value copied from config.json must have (its annotation, Optional removed)."""
    kinds = {}
    for name, hint in typing.get_type_hints(GPTArch).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kinds[name] = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    return kinds


def _checked(family: Family, arch_field: str, value, kind: type):
    """`value` of config.json's key for `arch_field`, checked against the field's type."""
    key = family.config[arch_field]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConversionError(f"config.json {key}={value!r}: expected a positive integer")
    if kind is float:
        return number(key, value)
    if kind is bool and not isinstance(value, bool):
        raise ConversionError(f"config.json {key}={value!r}: expected true or false")
    if kind is str and not isinstance(value, str):
        raise ConversionError(f"config.json {key}={value!r}: expected a string")
    return value


def arch_from_hf_config(family: Family, config: dict, vocab_multiple: Optional[int] = None, kv_replicas: int = 1) -> GPTArch:
    """The GPTArch of an HF config. Vocabulary rows are padded only as far as needed: to the smallest
    multiple that every valid TP size divides (usually no padding), or, if `vocab_multiple` is given,
    to the smallest multiple of both. Padded entries enter Megatron's softmax (see `padded_vocab_size`).
    `kv_replicas` copies of each KV head make megatron-core's query groups KV heads x kv_replicas, and
    so the valid TP sizes (and the padding) those of that many groups.

    Keys config.json omits take the family's HF config class defaults (`Family.hf_defaults`), as
    transformers reads the file."""
    config = {**family.hf_defaults, **config}
    for refusal in family.refusals:
        value = config.get(refusal.key)
        try:
            acceptable = refusal.acceptable(value, config)
        except (TypeError, ValueError):  # e.g. a string where a number belongs
            acceptable = False
        if not acceptable:
            raise ConversionError(f"config.json {refusal.key}={value!r}: {refusal.why}")
    fields = {}
    for arch_field, key in family.config.items():
        if key in config and config[key] is not None:
            fields[arch_field] = config[key]
    fields.setdefault("num_query_groups", fields.get("num_attention_heads"))
    missing = [k for k in REQUIRED if fields.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(family.config[k] for k in missing)}")
    kinds = field_kinds()
    fields = {name: _checked(family, name, value, kinds[name]) for name, value in fields.items()}
    if fields["num_attention_heads"] % fields["num_query_groups"]:
        raise ConversionError(
            f"config.json num_key_value_heads={fields['num_query_groups']} does not divide "
            f"num_attention_heads={fields['num_attention_heads']}"
        )
    heads_per_kv_head = fields["num_attention_heads"] // fields["num_query_groups"]
    if kv_replicas < 1 or heads_per_kv_head % kv_replicas:
        valid = [r for r in range(1, heads_per_kv_head + 1) if heads_per_kv_head % r == 0]
        raise ConversionError(
            f"--kv-replicas {kv_replicas}: the {fields['num_attention_heads']} attention heads share "
            f"{fields['num_query_groups']} KV heads ({heads_per_kv_head} each), and the copies of a KV head must split "
            f"its query heads evenly; valid values: {valid}"
        )
    fields["num_query_groups"] *= kv_replicas
    fields["kv_replicas"] = kv_replicas
    for arch_field, value in family.fixed.items():
        fields[arch_field] = bool(config.get(value.key)) if isinstance(value, HFFlag) else value
    fields.update(family.derived(config))
    if fields.get("kv_channels") == fields["hidden_size"] // fields["num_attention_heads"]:
        fields.pop("kv_channels")
    vocab = fields["vocab_size"]
    max_tp = max_tensor_parallel(fields["num_attention_heads"], fields["num_query_groups"], fields["ffn_hidden_size"])
    padded = padded_vocab_size(vocab, max_tp, vocab_multiple)
    if padded != vocab:
        fields["vocab_size"], fields["unpadded_vocab_size"] = padded, vocab
    try:
        return GPTArch(**fields)
    except ValueError as e:  # values each fine alone that do not make one model
        raise ConversionError(f"config.json describes no model this converter can build: {e}") from None
