"""Meta's real Llama-3 tokenizer (128,256 ids, tiktoken BPE), from the file the PyPI package
`llama-models` ships (llama_models/llama3/tokenizer.model; install it with `--no-deps`), as a Hugging
Face fast tokenizer.

The conversion (transformers' TikTokenConverter: tiktoken ranks -> byte-level BPE merges, Meta's split
regex, the 256 special tokens at 128000+) takes seconds, so the first call saves the result in the
cache (testing/cache.py). As Meta's Hugging Face tokenizers do, it puts
BOS `<|begin_of_text|>` in front of text; EOS is `<|eot_id|>`, as in the Instruct models. `meta_tokenizer()` is Meta's own tiktoken-based class from the same package: an
independent implementation to check the converted tokenizer's ids against.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from wit_megatron.testing.cache import built_once

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llama-models is not installed: pip install --no-deps llama-models")
    return Path(next(iter(spec.submodule_search_locations)))


def tiktoken_model_path() -> Path:
    path = _package_dir() / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llama-models package")
    return path


@lru_cache(maxsize=None)
def meta_tokenizer():
    """Meta's `llama_models.llama3.tokenizer.Tokenizer` (tiktoken) over the shipped file."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(tiktoken_model_path())


def tokenizer_dir() -> Path:
    return built_once(f"llama3-tokenizer-{tiktoken_model_path().stat().st_size}", "tokenizer.json", _build)


def _build(out: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = meta_tokenizer()
    special = sorted(meta.special_tokens, key=meta.special_tokens.get)
    backend = TikTokenConverter(vocab_file=str(tiktoken_model_path()), pattern=meta.pat_str, extra_special_tokens=special).converted()
    bos = (BOS, meta.special_tokens[BOS])
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS).save_pretrained(out)


@lru_cache(maxsize=None)
def load_tokenizer():
    """Llama-3: byte-level BPE with Meta's split regex, 128,256 ids, adds BOS (128000), EOS <|eot_id|>
    (128009), no pad, no chat template of its own."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))
