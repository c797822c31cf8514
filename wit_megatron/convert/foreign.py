"""The architecture of a torch_dist checkpoint this project did not write (it has no wit_megatron record).

Megatron-LM's saves (`pretrain_gpt.py`, `megatron.training.save_checkpoint`) describe the model in the
`args` of their common state; Megatron-Bridge's in the `model:` section of the `run_config.yaml` in the
iteration directory. Either is read into the same description (`Description`: megatron-core's
TransformerConfig words), which becomes a GPTArch of the Llama-like families stock Megatron-LM builds
(RMSNorm, SwiGLU, RoPE): Llama, Qwen2 (a QKV bias) or Qwen3 (q/k norms). The vocabulary rows are the
stored embedding's.

The HF config.json written with the weights is then either `--hf-config`'s (a template: the model's
own HF config, e.g. the one it was converted from), checked field by field against what the checkpoint
says, or written from the GPTArch by transformers' config class and checked to read back as exactly
that GPTArch. A template also supplies what the checkpoint does not say; when neither does, one error
names the missing fields and the option that supplies them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from wit_megatron.convert.families import family_for
from wit_megatron.convert.hf_config import arch_from_hf_config
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch

BRIDGE_CONFIG = "run_config.yaml"
HF_CONFIG_HELP = ("give --hf-config DIR (the model's Hugging Face config.json, or its directory, e.g. the one it was "
                  "converted from): the export takes the missing settings from it and checks every other one, and "
                  "every tensor shape, against the checkpoint")

# Description keys (megatron-core TransformerConfig / Megatron-LM words) whose absence means the
# checkpoint does not describe the model: the sizes, and what decides the layer's numerics.
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "normalization", "norm_epsilon",
            "gated_silu", "position_embedding_type", "rotary_base", "tie_embeddings", "max_position_embeddings")
# What the Llama-like families need of the rest; another value is a model this exporter has no table for.
SUPPORTED = {"normalization": "RMSNorm", "gated_silu": True, "position_embedding_type": "rope", "rotary_percent": 1.0,
             "layernorm_1p": False, "num_experts": None, "multi_latent_attention": False}
# HF architecture by (add_qkv_bias without add_bias_linear, qk_layernorm).
LLAMA_LIKE = {(False, False): "LlamaForCausalLM", (True, False): "Qwen2ForCausalLM", (False, True): "Qwen3ForCausalLM"}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclasses.dataclass
class Description:
    """What a foreign checkpoint says about its model (None: not said), and where it says it."""

    source: str  # e.g. "the Megatron-LM args in its common state"
    fields: dict[str, Any]
    names: dict[str, str]  # field -> the source's own name for it, where it differs

    def missing(self) -> list[str]:
        """The source's names of the required fields it does not state."""
        return [self.names.get(name, name) for name in REQUIRED if self.fields.get(name) is None]


MEGATRON_LM_NAMES = {"gated_silu": "swiglu", "tie_embeddings": "untie_embeddings_and_output_weights",
                     "norm_epsilon": "layernorm_epsilon (--norm-epsilon)"}
BRIDGE_NAMES = {"gated_silu": "gated_linear_unit and activation_func", "norm_epsilon": "layernorm_epsilon",
                "tie_embeddings": "share_embeddings_and_output_weights", "max_position_embeddings": "seq_length"}


_ABSENT = object()


def from_megatron_lm_args(args, source: str) -> Description:
    """Megatron-LM's `args` (argparse.Namespace, as its save stores it after validate_args). A feature
    switch an older Megatron-LM did not have (qk_layernorm, use_rope_scaling, ...) reads as off; sizes,
    norm, activation and RoPE base must be there."""

    def get(name, default=None):
        value = getattr(args, name, _ABSENT)
        return default if value is _ABSENT else value

    heads = get("num_attention_heads")
    rope_scaling = bool(get("use_rope_scaling", False))
    return Description(source, {
        "num_layers": get("num_layers"), "hidden_size": get("hidden_size"), "num_attention_heads": heads,
        "num_query_groups": get("num_query_groups") if get("group_query_attention", False) else heads,
        "ffn_hidden_size": get("ffn_hidden_size"), "kv_channels": get("kv_channels"),
        "max_position_embeddings": get("max_position_embeddings"),
        # Megatron-LM's parser stores --norm-epsilon / --apply-layernorm-1p as layernorm_epsilon /
        # layernorm_zero_centered_gamma (0.19); older saves, and older versions of this project, by their option names.
        "normalization": get("normalization"), "norm_epsilon": get("layernorm_epsilon", get("norm_epsilon")),
        "gated_silu": get("swiglu"), "position_embedding_type": get("position_embedding_type"),
        "rotary_base": get("rotary_base"), "rotary_percent": get("rotary_percent", 1.0),
        "rope_scaling_factor": get("rope_scaling_factor") if rope_scaling else None,
        "tie_embeddings": None if get("untie_embeddings_and_output_weights") is None
        else not get("untie_embeddings_and_output_weights"),
        "add_qkv_bias": bool(get("add_qkv_bias", False)), "add_bias_linear": bool(get("add_bias_linear", False)),
        "qk_layernorm": bool(get("qk_layernorm", False)), "layernorm_1p": bool(get("layernorm_zero_centered_gamma", False) or get("apply_layernorm_1p", False)),
        "num_experts": get("num_experts"), "multi_latent_attention": bool(get("multi_latent_attention", False)),
        "vocab_size": None,
    }, MEGATRON_LM_NAMES)


def from_bridge_config(model: dict, source: str) -> Description:
    """The `model:` section of Megatron-Bridge's run_config.yaml (its GPT provider's fields: megatron-core's
    TransformerConfig plus vocab_size, seq_length, rotary_base, share_embeddings_and_output_weights)."""
    activation = model.get("activation_func")
    if isinstance(activation, dict):  # written as {_target_: torch.nn.functional.silu, _call_: false}
        activation = activation.get("_target_")
    gated = model.get("gated_linear_unit")
    heads = model.get("num_attention_heads")
    scaling = model.get("rope_scaling")
    share = model.get("share_embeddings_and_output_weights")
    return Description(source, {
        "num_layers": model.get("num_layers"), "hidden_size": model.get("hidden_size"), "num_attention_heads": heads,
        "num_query_groups": model.get("num_query_groups") or heads, "ffn_hidden_size": model.get("ffn_hidden_size"),
        "kv_channels": model.get("kv_channels"), "max_position_embeddings": model.get("seq_length"),
        "normalization": model.get("normalization"), "norm_epsilon": model.get("layernorm_epsilon"),
        "gated_silu": None if gated is None or activation is None else bool(gated) and str(activation).endswith(".silu"),
        "position_embedding_type": model.get("position_embedding_type"), "rotary_base": model.get("rotary_base"),
        "rotary_percent": model.get("rotary_percent", 1.0),
        "rope_scaling_factor": model.get("rope_scaling_factor") if scaling else None,
        "tie_embeddings": None if share is None else bool(share),
        "add_qkv_bias": bool(model.get("add_qkv_bias", False)), "add_bias_linear": bool(model.get("add_bias_linear", False)),
        "qk_layernorm": bool(model.get("qk_layernorm", False)),
        "layernorm_1p": bool(model.get("layernorm_zero_centered_gamma", False)),
        "num_experts": model.get("num_moe_experts"), "multi_latent_attention": bool(model.get("multi_latent_attention", False)),
        "vocab_size": model.get("vocab_size"),
    }, BRIDGE_NAMES)


def read_bridge_config(directory: Path) -> Optional[Description]:
    """The description in `directory`/run_config.yaml, if there is one (plain YAML, read safely)."""
    import yaml

    path = Path(directory) / BRIDGE_CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable YAML ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConversionError(f"{path}: no `model:` section, the part of Megatron-Bridge's run config that describes the model")
    return from_bridge_config(config["model"], f"its {BRIDGE_CONFIG} (Megatron-Bridge)")


def arch_from_description(description: Description, embedding_rows: int, where: Path) -> GPTArch:
    """The GPTArch a complete description gives (a ConversionError naming what is missing or unsupported)."""
    missing = description.missing()
    if missing:
        raise ConversionError(f"{where}: {description.source} does not say {', '.join(missing)}; {HF_CONFIG_HELP}")
    fields = description.fields
    unsupported = [f"{name}={fields.get(name)!r} (supported: {value!r})" for name, value in SUPPORTED.items()
                   if fields.get(name, value) != value]
    if unsupported:
        raise ConversionError(f"{where}: {description.source} describes a model the Llama-like families do not cover: "
                              f"{', '.join(unsupported)}")
    heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
    kv_channels = fields.get("kv_channels")
    vocab = fields.get("vocab_size")
    try:
        return GPTArch(
            vocab_size=embedding_rows, num_layers=fields["num_layers"], hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=fields["num_query_groups"], ffn_hidden_size=fields["ffn_hidden_size"],
            max_position_embeddings=fields["max_position_embeddings"],
            rotary_base=float(fields["rotary_base"]), norm_epsilon=float(fields["norm_epsilon"]),
            tie_embeddings=fields["tie_embeddings"], add_qkv_bias=fields["add_qkv_bias"] and not fields["add_bias_linear"],
            qk_layernorm=fields["qk_layernorm"], kv_channels=None if kv_channels in (None, hidden // heads) else kv_channels,
            add_bias_linear=fields["add_bias_linear"],
            rope_scaling_factor=None if fields.get("rope_scaling_factor") is None else float(fields["rope_scaling_factor"]),
            unpadded_vocab_size=vocab if vocab is not None and vocab < embedding_rows else None,
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {description.source} describes no model this exporter can build ({e})") from None


def architecture_name(arch: GPTArch, where: Path) -> str:
    name = LLAMA_LIKE.get((arch.add_qkv_bias and not arch.add_bias_linear, arch.qk_layernorm))
    if name is None:
        raise ConversionError(f"{where}: a QKV bias together with q/k norms is none of the Llama-like families "
                              f"({', '.join(LLAMA_LIKE.values())}); {HF_CONFIG_HELP}")
    return name


def hf_config_from_arch(arch: GPTArch, dtype: str, where: Path) -> dict:
    """config.json for `arch` as transformers' config class of its family writes it, checked to read back
    (through this project's config table) as exactly `arch`."""
    import transformers

    name = architecture_name(arch, where)
    _, family = family_for({"architectures": [name]})
    values = {key: getattr(arch, field) for field, key in family.config.items()}
    values["vocab_size"] = arch.tokenizer_vocab_size
    values["num_key_value_heads"] = arch.hf_kv_heads
    if arch.kv_channels is None:  # the config class's default head dim (hidden / heads), if it has the key
        del values["head_dim"]
    rope = {"rope_type": "default", "rope_theta": arch.rotary_base}
    if arch.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": arch.rotary_base}
    values.update(rope_parameters=rope, hidden_act="silu", dtype=dtype)
    if name != "Qwen2ForCausalLM":
        values.update(attention_bias=arch.add_bias_linear)
    if name == "LlamaForCausalLM":
        values.update(mlp_bias=arch.add_bias_linear)
    config = transformers.AutoConfig.for_model(MODEL_TYPES[name], **values).to_diff_dict()  # as save_pretrained writes it
    config["architectures"] = [name]
    config = json.loads(json.dumps(config))  # as config.json holds it
    back = arch_from_hf_config(family, config)
    if back != arch:
        differ = {f.name: (getattr(arch, f.name), getattr(back, f.name)) for f in dataclasses.fields(GPTArch)
                  if getattr(arch, f.name) != getattr(back, f.name)}
        raise ConversionError(f"{where}: the {name} config written for this checkpoint reads back differently "
                              f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in differ.items())}); {HF_CONFIG_HELP}")
    return config


def special_token_ids(tokenizer_dir: Path) -> dict:
    """bos/eos/pad token ids of the HF tokenizer in `tokenizer_dir` (those it defines), for a config.json
    written from a checkpoint's description: generation reads them from there."""
    from wit_megatron.convert.hf_to_mcore import has_tokenizer

    if not has_tokenizer(tokenizer_dir):
        return {}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{tokenizer_dir}: the checkpoint's tokenizer does not load ({e})") from None
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return {key: value for key, value in ids.items() if value is not None}


def read_template(path: Path) -> tuple[dict, Path]:
    """(config.json's content, its directory) of `--hf-config` (a config.json or a directory holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConversionError(f"--hf-config {path}: no such file{' (no config.json in it)' if path.is_dir() else ''}") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"--hf-config {file}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"--hf-config {file}: expected a JSON object")
    return config, file.parent


def arch_from_template(template: dict, template_file: Path, embedding_rows: int, where: Path, kv_replicas: int = 1) -> GPTArch:
    """The GPTArch of the template config with the checkpoint's vocabulary rows (the template's vocab_size,
    if smaller, is the unpadded vocabulary)."""
    try:
        arch = arch_from_hf_config(family_for(template)[1], template, kv_replicas=kv_replicas)
    except ConversionError as e:
        raise ConversionError(f"--hf-config {template_file}: {e}") from None
    vocab = arch.tokenizer_vocab_size
    if vocab > embedding_rows:
        raise ConversionError(f"--hf-config {template_file}: vocab_size {vocab} is more than the checkpoint's "
                              f"{embedding_rows} embedding rows ({where}): not this model's config")
    return dataclasses.replace(arch, vocab_size=embedding_rows, unpadded_vocab_size=vocab if vocab < embedding_rows else None)


def _as_description(arch: GPTArch) -> dict:
    """`arch` in Description's words, for comparing a template with what a checkpoint states."""
    return {
        "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups, "ffn_hidden_size": arch.ffn_hidden_size,
        "kv_channels": arch.kv_channels or arch.hidden_size // arch.num_attention_heads, "normalization": "RMSNorm",
        "norm_epsilon": arch.norm_epsilon, "gated_silu": arch.activation == "silu", "position_embedding_type": "rope",
        "rotary_base": arch.rotary_base, "rotary_percent": 1.0, "rope_scaling_factor": arch.rope_scaling_factor,
        "tie_embeddings": arch.tie_embeddings, "add_qkv_bias": arch.add_qkv_bias or arch.add_bias_linear,
        "add_bias_linear": arch.add_bias_linear, "qk_layernorm": arch.qk_layernorm, "layernorm_1p": arch.norm_weight_plus_one,
        "num_experts": None, "multi_latent_attention": False,
    }


def _same(stated, template) -> bool:
    """Equal, floats within float32 rounding: an ε or RoPE base that passed through float32 on one side
    (a GGUF-made config.json holds 9.999999747378752e-06 for 1e-05) is the same setting."""
    if isinstance(stated, float) and isinstance(template, float):
        return math.isclose(stated, template, rel_tol=1e-6)
    return stated == template


def check_description(description: Description, arch: GPTArch, template_file: Path, where: Path) -> None:
    """Refuse a template whose architecture differs from anything the checkpoint states, naming each field."""
    template = _as_description(arch)
    stated = dict(description.fields)
    stated["add_qkv_bias"] = bool(stated.get("add_qkv_bias")) or bool(stated.get("add_bias_linear"))
    if stated.get("kv_channels") is None and stated.get("hidden_size") and stated.get("num_attention_heads"):
        stated["kv_channels"] = stated["hidden_size"] // stated["num_attention_heads"]  # Megatron's default head dim
    differ = [f"{description.names.get(name, name)}: checkpoint {value!r}, template {template[name]!r}"
              for name, value in stated.items() if name in template and value is not None and not _same(value, template[name])]
    if differ:
        raise ConversionError(f"--hf-config {template_file} does not describe the checkpoint {where} ({description.source}): "
                              f"{'; '.join(differ)}")


EMBEDDING = "embedding.word_embeddings.weight"
BRIDGE_TOKENIZER = "tokenizer"  # Megatron-Bridge saves the HF tokenizer here, in the iteration directory


def _embedding(directory: Path, tensors: dict) -> tuple[int, str]:
    """(rows, dtype name) of the stored word embedding."""
    stored = tensors.get(EMBEDDING)
    if stored is None:
        raise ConversionError(f"{directory}: no {EMBEDDING} tensor: not a Megatron-Core GPT checkpoint")
    return stored.size[0], str(stored.properties.dtype).removeprefix("torch.")


def record(root: Path, directory: Path, metadata, common: dict, hf_config: Optional[Path]) -> dict:
    """An architecture record (as this project's converter writes, plus `source`: what it was read from,
    and `assets`: where the tokenizer is) for a checkpoint without one."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from wit_megatron import checkpoint as ckpt

    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    rows, dtype = _embedding(directory, tensors)
    description = read_bridge_config(directory)
    if description is None and common.get("args") is not None:
        description = from_megatron_lm_args(common["args"], "the Megatron-LM args in its common state")
    if hf_config is not None:
        template, template_dir = read_template(hf_config)
        arch = arch_from_template(template, template_dir / "config.json", rows, directory)
        config, source, assets = dict(template), f"--hf-config {hf_config}", template_dir
        if description is not None:
            check_description(description, arch, template_dir / "config.json", directory)
            source += f", checked against {description.source}"
    elif description is None:
        raise ConversionError(f"{directory}: no wit_megatron record, no Megatron-LM args in its common state and no "
                              f"{BRIDGE_CONFIG}: nothing says which model it holds; {HF_CONFIG_HELP}")
    else:
        arch, source, assets = arch_from_description(description, rows, directory), description.source, None
        config = hf_config_from_arch(arch, dtype, directory)
    bridge_tokenizer = directory / BRIDGE_TOKENIZER
    if bridge_tokenizer.is_dir():
        assets = bridge_tokenizer
    elif (root / ckpt.ASSETS).is_dir():
        assets = root / ckpt.ASSETS
    if hf_config is None and assets is not None:
        config.update(special_token_ids(assets))
    family, _ = family_for(config)
    return {"format": ckpt.RECORD_FORMAT, "family": family, "dtype": dtype, "arch": arch.to_dict(), "hf_config": config,
            "source": source, "assets": None if assets is None else str(assets)}


def with_template(own: dict, directory: Path, metadata, hf_config: Path) -> dict:
    """This project's record with `--hf-config`'s config.json instead of the recorded one: the template
    must give exactly the recorded architecture."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    rows, _ = _embedding(directory, tensors)
    recorded = GPTArch.from_dict(own["arch"])
    template, template_dir = read_template(hf_config)
    arch = arch_from_template(template, template_dir / "config.json", rows, directory, recorded.kv_replicas)
    differ = [f"{f.name}: checkpoint {getattr(recorded, f.name)!r}, template {getattr(arch, f.name)!r}"
              for f in dataclasses.fields(GPTArch) if getattr(recorded, f.name) != getattr(arch, f.name)]
    if differ:
        raise ConversionError(f"--hf-config {template_dir / 'config.json'} does not describe the checkpoint {directory}: "
                              f"{'; '.join(differ)}")
    return dict(own, hf_config=dict(template))
