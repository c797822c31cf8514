"""Tiny random Hugging Face models of every supported family and edge case, built from real configs: the
`examples` each family module declares (wit_megatron/convert/families/), over BASE."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wit_megatron.convert.families import families

BASE = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4, max_position_embeddings=64,
            rms_norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# name -> (transformers config class, overrides). vocab 100 needs no padding (every valid TP divides it).
CASES = {name: case for family in families() for name, case in family.examples.items()}


def architecture(config_class: str) -> str:
    """The causal-LM class transformers builds for a config class (Gemma3TextConfig -> Gemma3ForCausalLM)."""
    import transformers

    config = getattr(transformers, config_class)()
    return transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init defaults (norms ≠ 1, biases ≠ 0), so a swapped or dropped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


def build(case: str, directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    import transformers

    config_class, overrides = CASES[case]
    config = getattr(transformers, config_class)(**dict(BASE, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(directory)
    return directory


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(directory / name))
    return tensors


# Which of three shard files an HF tensor goes to in `shard`: a layer's q/k/v projections (Megatron's one
# linear_qkv) in three different files, its gate/up projections (linear_fc1) in two; the rest by layer.
SHARD_OF_PROJECTION = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 2, "up_proj": 0}
SHARD_OF_OTHER = {"model.embed_tokens.weight": 2, "model.norm.weight": 1, "lm_head.weight": 0}


def shard_file_of(name: str, files: int = 3) -> int:
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return SHARD_OF_PROJECTION.get(parts[4], int(parts[2]) % files) if len(parts) > 4 else int(parts[2]) % files
    return SHARD_OF_OTHER[name]


def shard(directory: Path, out: Path, files: int = 3) -> Path:
    """The HF checkpoint in `directory` rewritten the way models of 7B and up ship: `files`
    model-0000i-of-0000n.safetensors files and model.safetensors.index.json, with the HF tensors that
    make up one Megatron tensor spread over different files (see SHARD_OF_PROJECTION)."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for extra in ("config.json", "generation_config.json"):
        shutil.copy(directory / extra, out / extra)
    tensors = safetensors_of(directory)
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    weight_map = {name: names[shard_file_of(name, files)] for name in sorted(tensors)}
    for file in names:
        save_file({n: tensors[n].contiguous() for n, f in weight_map.items() if f == file}, out / file, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out

