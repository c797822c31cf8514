"""Tokenizers that behave like the chat families users fine-tune, built offline from the real tokenizers
in wit_megatron.testing, with each family's chat template (tests/data/chat_templates, written from the
families' published templates) and the special tokens the template uses:

    gemma3   Mistral's SentencePiece tokenizer (Gemma's is SentencePiece BPE with byte fallback too) +
             <start_of_turn>, <end_of_turn>; Gemma 3's template: the system prompt folded into the first
             user turn, the assistant's turns under the role name `model`
    qwen3    SmolLM2's byte-level BPE with ChatML tokens (as Qwen's) + <think>, </think>, <tool_call>,
             </tool_call>, <tool_response>, </tool_response> (not special, as in Qwen3's); Qwen3's
             template: <think> blocks, reasoning stripped from earlier turns, tool calls and results
    llama3.1 Meta's Llama-3 tokenizer (its special tokens include 3.1's <|eom_id|>, <|python_tag|>);
             Llama-3.1's template: a date/knowledge header in the system turn, tools in the first user
             turn, tool results under the role `ipython`

`<family>.generation.jinja` is the same template with `{% generation %}` around what the assistant
writes (after the generation prompt, through its end-of-turn token): it renders the same text, and
transformers' `return_assistant_tokens_mask` then labels the assistant's tokens independently of
wit_megatron's ChatEncoder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from wit_megatron.testing import llama3, mistral, smollm2

TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"
FAMILIES = ("gemma3", "qwen3", "llama3.1")


def template(family: str, generation: bool = False) -> str:
    return (TEMPLATES / f"{family}{'.generation' if generation else ''}.jinja").read_text()


@lru_cache(maxsize=None)
def tokenizer(family: str):
    """A fresh tokenizer of `family` (see the module docstring) with its template as chat_template."""
    from transformers import AutoTokenizer

    source = {"gemma3": mistral, "qwen3": smollm2, "llama3.1": llama3}[family]
    tok = AutoTokenizer.from_pretrained(str(source.tokenizer_dir()))
    if family == "gemma3":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    if family == "qwen3":
        tok.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = template(family)
    return tok
