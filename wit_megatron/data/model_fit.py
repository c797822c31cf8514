"""Whether preprocessed datasets can train a checkpoint's model, checked when training starts.

- Every dataset must be readable and hold records (a dataset of 0 records, or a truncated .bin, is
  named with its prefix, not met later as megatron-core's "cannot mmap an empty file").
- Every token id must be inside the model's vocabulary (the HF model's rows, `tokenizer_vocab_size`):
  the first record holding one that is not is named (otherwise: an IndexError deep in the embedding,
  or silent training on padding rows).
- The dataset must have been tokenized with the checkpoint's tokenizer (the one it carries in
  hf_assets/): vocabulary size, special ids and fingerprint compared (data/tokenizer_identity.py).
  A mismatch is refused naming both tokenizers, unless the user says they know (`allow_mismatch`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from wit_megatron.data.indexed import WITIndexedData, meta_path
from wit_megatron.data.tokenizer_identity import differences, tokenizer_identity


def check_data_fits_model(datasets: Sequence[tuple[str, str]], checkpoint, allow_mismatch: bool) -> list[str]:
    """`datasets`: (option, prefix) pairs. Raise ValueError naming the option, prefix and what is wrong;
    returns notes for the log (what could not be compared, a mismatch allowed)."""
    notes = []
    model_tokenizer = _checkpoint_tokenizer(checkpoint)
    if model_tokenizer is None:
        notes.append(f"--load {checkpoint.root} carries no tokenizer (no {checkpoint.root / 'hf_assets'} with tokenizer "
                     "files): the data's tokenizer could not be compared with the model's")
    vocab = checkpoint.arch.tokenizer_vocab_size
    for option, prefix in dict.fromkeys(datasets):
        try:
            data = WITIndexedData(prefix)
        except (OSError, ValueError) as e:
            raise ValueError(f"{option}: {prefix}: cannot be read: {e}") from None
        _check_ids(data, vocab, checkpoint, option)
        if model_tokenizer is not None:
            identity, where = model_tokenizer
            different = differences(data.meta, identity)
            if different:
                said = (f"{option} {prefix} was tokenized with {data.meta.get('tokenizer')!r}, not with --load's tokenizer "
                        f"({where}): {'; '.join(different)} (data vs checkpoint)")
                if not allow_mismatch:
                    raise ValueError(f"{said}. Preprocess the data with the checkpoint's tokenizer, or pass "
                                     "--allow-tokenizer-mismatch if you know they agree")
                notes.append(f"--allow-tokenizer-mismatch: {said}")
            elif "tokenizer_fingerprint" not in data.meta:
                notes.append(f"{meta_path(prefix)} predates tokenizer fingerprints: only the vocabulary size and special "
                             "ids were compared with the checkpoint's tokenizer")
    return notes


def _check_ids(data: WITIndexedData, vocab: int, checkpoint, option: str) -> None:
    largest = data.meta.get("max_token_id")
    if largest is None:  # written before the largest id was recorded: read them all once
        largest = int(data.tokens.max()) if len(data.tokens) else -1
    if largest < vocab:
        return
    position = int(np.flatnonzero(data.tokens >= vocab)[0])
    record = int(np.searchsorted(data.starts, position, side="right")) - 1
    raise ValueError(f"{option} {data.prefix}: record {record} (0-based) holds token id {int(data.tokens[position])}, outside "
                     f"the model's vocabulary of {vocab} ids (--load {checkpoint.root}): the data was tokenized for another "
                     "model")


def _checkpoint_tokenizer(checkpoint) -> Optional[tuple[dict, str]]:
    """(identity, where) of the tokenizer the checkpoint carries, if any."""
    assets: Optional[Path] = checkpoint.assets
    if assets is None or not any((assets / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                                       "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(assets))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"--load: the tokenizer kept with the checkpoint ({assets}) cannot be loaded: {e}") from None
    return tokenizer_identity(tokenizer), str(assets)
