"""Mistral-7B-Instruct-v0.1's SentencePiece tokenizer, from the file PyPI package `mistral-common` ships
(mistral_common/data/tokenizer.model.v1), as a Hugging Face tokenizer.

Converting SentencePiece to a fast tokenizer takes seconds, so the first call saves the result in the
cache (testing/cache.py). `legacy=True` is how Mistral's own Hugging Face
tokenizer is configured; with it, ids equal mistral-common's `encode_chat_completion`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from wit_megatron.testing.cache import built_once

MODEL_NAME = "tokenizer.model.v1"


def sentencepiece_path() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package mistral-common is not installed: pip install mistral-common")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the mistral-common package")
    return path


def tokenizer_dir() -> Path:
    source = sentencepiece_path()
    return built_once(f"mistral-v1-tokenizer-legacy-{source.stat().st_size}", "tokenizer.json", _build)


def _build(out: Path) -> None:
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory(dir=out) as src:
        shutil.copy(sentencepiece_path(), Path(src) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(src, legacy=True, add_bos_token=True)
    tokenizer.save_pretrained(out)
    # save_pretrained drops both flags, and a reload without them tokenizes differently.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(legacy=True, add_bos_token=True)
    config_path.write_text(json.dumps(config, indent=2))


@lru_cache(maxsize=None)
def load_tokenizer():
    """Mistral v1: SentencePiece BPE, 32000 ids, adds BOS <s> (1), eos </s> (2), no pad, no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))
