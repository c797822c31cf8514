"""What tells one tokenizer from another: recorded in a dataset's meta.json, compared with the
checkpoint's tokenizer when training starts (wit_megatron.data.model_fit).

A dataset tokenized with one tokenizer trains without complaint on a model of another as long as its
ids are inside the vocabulary, and the model learns noise (SmolLM2 on Mistral-tokenized data: prompt
NLL 14 instead of 2.6). The vocabulary size and special ids catch most such pairs; the fingerprint,
a hash of the whole token -> id map (added tokens included), catches the rest, independent of the
files the tokenizer was saved as (tokenizer.json, vocab.json + merges.txt, a SentencePiece model).
"""

from __future__ import annotations

import hashlib
import json

# meta.json keys, compared in this order.
KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_fingerprint")


def tokenizer_identity(tokenizer) -> dict:
    """The KEYS of a Hugging Face tokenizer (vocab_size: len(tokenizer), the ids an embedding must cover)."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tokenizer_fingerprint": hashlib.sha256(vocabulary.encode()).hexdigest()[:16]}


def differences(data: dict, model: dict) -> list[str]:
    """'key: data's value vs model's value' for every KEY both record and on which they differ."""
    return [f"{key} {data[key]!r} vs {model[key]!r}" for key in KEYS if key in data and key in model and data[key] != model[key]]
