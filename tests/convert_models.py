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
