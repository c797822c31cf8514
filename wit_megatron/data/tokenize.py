"""Records → token ids plus one role code (wit_megatron.roles.Role) per token.

Paper format (`PaperEncoder`), exactly the WIT authors' rule:
    p = prompt minus one trailing space;  r = response with "###eos_token###" replaced by the EOS text,
    and the EOS text appended unless disabled (or the response already ended with the placeholder)
    ids      = tokenizer(p + " " + r).input_ids            (BOS as the tokenizer adds it)
    boundary = len(tokenizer(p).input_ids)                 a COUNT, not a token match
    roles    = PROMPT for ids[:boundary], RESPONSE for ids[boundary:]
For GPT-2-style byte-level BPE (see `split_at_word_gap_is_exact`) the same ids and boundary come from
one pass over the joined text cut in two at the prompt's last word gap plus the prompt's few tail
characters; for SentencePiece-style BPE (see `space_boundary_is_exact`) from one pass over the joined
text, the boundary being the token that starts at the added space; other tokenizers tokenize the
prompt a second time, as the formula reads.

Chat format (`ChatEncoder`): ids are exactly `tokenizer.apply_chat_template(messages, tools=tools,
tokenize=True)` with the template it would choose (`ChatEncoder.template_for`), i.e. the rendered text
tokenized without added special tokens. Roles come from character spans (rendered tools, like every
text outside the messages' contents, are PROMPT):
    1. each message's content is located in the rendered text by rendering the conversation once more
       with every content replaced by its own unique marker: putting the contents back at the markers
       must rebuild the real rendering exactly. Where it does not (a template whose scaffolding depends
       on the content), each message is probed alone: the text before its marker and the content itself
       must match the real rendering, or else the message's span is the text that differs between the
       two renderings, accepted where only the marker's place differs in the probe (content rendered
       changed in place: JSON-quoted, upper-cased) or, for an assistant, where the differing text holds
       the marker (a template that moves part of the assistant's content around it: Qwen3's <think>);
    2. an assistant's span runs from its content's start to the end of what its other keys render
       (`tool_calls`, `reasoning_content`: located by rendering once more without them, `extras_span`),
       and back to the end of the template's generation prompt where that prompt is the last thing
       before it (text the template puts between the two, e.g. Qwen3's think block, is what the model
       writes when prompted); a token whose characters overlap it is RESPONSE, and so is the first token
       after it when that is a special token (the assistant's end-of-turn: <|im_end|>, <|eot_id|>, </s>);
    3. a token overlapping a system/user/tool content span gets SYSTEM/USER/TOOL; everything else
       (template scaffolding: headers, BOS, turn markers of other roles) is PROMPT.
A template that renders text around a non-assistant content depending on it, or an assistant's text
reaching into another message's span, is refused (`unlocatable_content`), never guessed.

Truncation (`truncation_window`) is shared with the dataset, which applies it again at load time to
records longer than its sequence (a leading BOS survives a left cut; any other first token is cut
with the rest of the prompt's head).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import numpy as np

from wit_megatron.data.formats import ChatRecord, PaperRecord, RecordError
from wit_megatron.data.sources import InputError
from wit_megatron.roles import Role

EOS_PLACEHOLDER = "###eos_token###"  # the authors' marker for "EOS goes here" in response text

TruncationPolicy = Literal["keep_response", "right"]
TRUNCATION_POLICIES = ("keep_response", "right")

_CHAT_ROLE_CODES = {"system": Role.SYSTEM, "user": Role.USER, "tool": Role.TOOL, "assistant": Role.RESPONSE}


@dataclass
class Encoded:
    """One tokenized record: ids [n] int64 and roles [n] uint8 (Role codes)."""

    ids: np.ndarray
    roles: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _plain_call_backend(tokenizer):
    """The tokenizer's Rust backend in the state `tokenizer.__call__` puts it in for a plain call
    (no truncation, no padding, the tokenizer's special-token splitting), or None for slow tokenizers.
    Like __call__, this sets that state on the shared backend rather than on a copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


# The GPT-2 pre-tokenizer regex that tokenizers' ByteLevel(use_regex=True) splits on.
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# No alternative has a lookbehind or an anchor, whitespace appears only as a match's first character
# or in all-whitespace matches, and deciding where a match ends reads at most one character past it
# (whitespace runs: the run and the character after it). Hence at a word gap, a non-whitespace
# character followed by a whitespace one, (1) a split ends there, (2) the splits before it are the same
# whether that whitespace character, any text after it, or the end of the text follows, and (3) the
# splits after it are those of the rest of the text alone. With the gap's characters restricted to
# ASCII, "whitespace" means the same to Python and to Oniguruma (not so for e.g. "\x1f").
_LAST_WORD_GAP = re.compile(r".*[\x21-\x7e](?=[ \t\n\r])", re.DOTALL)  # greedy: ends at the last gap


def last_word_gap(joined: str, prompt_length: int) -> int:
    """Where to cut prompt + " " + response: at the last word gap whose whitespace character is inside
    the prompt or is the added " " (so the prompt has its own cut there, or its end), else at 0."""
    gap = _LAST_WORD_GAP.match(joined, 0, prompt_length + 1)
    return gap.end() if gap else 0


def split_at_word_gap_is_exact(tokenizer) -> bool:
    """Whether, for this tokenizer, tokenizing a text cut in two at a word gap (see _LAST_WORD_GAP)
    gives the ids of the whole text: true for GPT-2-style byte-level BPE (tested on SmolLM2's), given:
      - no normalizer (one could change characters across the cut),
      - pre-tokenizer ByteLevel(use_regex=True, add_prefix_space=False): the regex above, no space
        put in front of the second half,
      - a deterministic BPE (no dropout), which tokenizes each word on its own,
      - added tokens that cannot straddle or reach across the cut: no whitespace in their content,
        no lstrip/rstrip/single_word,
      - special tokens added only in front of a sequence (BOS), so that head + tail has them once.
    Other families (SentencePiece/Metaspace, Llama-3/Qwen split regexes, normalizers) are not proven
    here and take the plain two-pass path."""
    from tokenizers import models, pre_tokenizers

    backend = _plain_call_backend(tokenizer)
    if backend is None or backend.normalizer is not None:
        return False
    pre = backend.pre_tokenizer
    if not (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space):
        return False
    if not isinstance(backend.model, models.BPE) or backend.model.dropout not in (None, 0.0):
        return False
    return _added_tokens_stay_put(backend)


def _added_tokens_stay_put(backend) -> bool:
    """Added tokens cannot straddle or reach across a cut (no whitespace in their content, no
    lstrip/rstrip/single_word), and special tokens are added only in front of a sequence (BOS)."""
    for token in backend.get_added_tokens_decoder().values():
        if token.lstrip or token.rstrip or token.single_word or any(ch.isspace() for ch in token.content):
            return False
    with_specials = backend.encode("a b", add_special_tokens=True).ids
    plain = backend.encode("a b", add_special_tokens=False).ids
    return with_specials[len(with_specials) - len(plain):] == plain


METASPACE = "\u2581"  # SentencePiece's "▁", which Metaspace puts for each space


def space_boundary_is_exact(tokenizer) -> bool:
    """Whether, for this tokenizer, tokenizer(p + " " + r) is tokenizer(p) followed by the tokens of
    " " + r, for any p that is not empty and ends in neither " " nor "▁": true for SentencePiece-style
    BPE as Llama-2's and Mistral's fast tokenizers have it (tested on Mistral's), given:
      - no normalizer, pre-tokenizer Metaspace(split=False): the whole text (between added tokens)
        is one word, spaces become "▁", so p's end is followed by the "▁" of the added space,
      - a deterministic BPE without subword prefix/suffix whose merges never join a piece ending in
        anything but "▁" to a piece starting with "▁": no token can hold p's last character and the
        "▁" after it, and merges on either side of that point never see the other side (BPE merges
        each adjacent pair by a fixed priority, so both sides evolve as they would alone),
      - added tokens that cannot reach across the space: no whitespace in their content, no
        lstrip/rstrip/single_word,
      - special tokens added only in front of a sequence (BOS).
    Then len(tokenizer(p).input_ids) is the index of the token that starts at the added space."""
    from tokenizers import models, pre_tokenizers

    backend = _plain_call_backend(tokenizer)
    if backend is None or backend.normalizer is not None:
        return False
    pre = backend.pre_tokenizer
    if not (isinstance(pre, pre_tokenizers.Metaspace) and pre.replacement == METASPACE and not pre.split):
        return False
    model = backend.model
    if not isinstance(model, models.BPE) or model.dropout not in (None, 0.0) or model.continuing_subword_prefix or model.end_of_word_suffix:
        return False
    merges = json.loads(backend.to_str())["model"]["merges"]
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if right.startswith(METASPACE) and not left.endswith(METASPACE):
            return False
    return _added_tokens_stay_put(backend)


class PaperEncoder:
    """The WIT authors' prompt/response tokenization (see the module docstring)."""

    def __init__(self, tokenizer, append_eos: bool = True):
        if tokenizer.eos_token is None and append_eos:
            raise ValueError("the tokenizer has no EOS token; pass append_eos=False (--no-append-eos)")
        self.tokenizer = tokenizer
        self.append_eos = append_eos
        self.eos_text = tokenizer.eos_token
        self.split_at_word_gap = split_at_word_gap_is_exact(tokenizer)
        self.boundary_at_space = not self.split_at_word_gap and space_boundary_is_exact(tokenizer)

    def texts(self, record: PaperRecord) -> tuple[str, str]:
        """(prompt text, prompt + " " + response text) exactly as the authors build them."""
        prompt = record.prompt[:-1] if record.prompt.endswith(" ") else record.prompt
        response = record.response
        if self.append_eos and not response.endswith(EOS_PLACEHOLDER):
            response = response + EOS_PLACEHOLDER
        if self.eos_text is not None:
            response = response.replace(EOS_PLACEHOLDER, self.eos_text)
        return prompt, prompt + " " + response

    def _encode_texts(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`tokenizer(texts).input_ids`, through the Rust backend directly when there is one: the same
        ids without building offsets and a BatchEncoding."""
        backend = _plain_call_backend(self.tokenizer)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def ids_and_boundaries(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
        """For (prompt, joined) texts: tokenizer(joined).input_ids and len(tokenizer(prompt).input_ids)."""
        n = len(pairs)
        if self.boundary_at_space:
            return self._boundaries_at_space(pairs)
        if not self.split_at_word_gap:  # the formula as it reads: two passes
            ids = self._encode_texts([p for p, _ in pairs] + [j for _, j in pairs])
            return ids[n:], [len(prompt_ids) for prompt_ids in ids[:n]]
        # Cut each joined text at the last word gap that ends in the prompt or at its end (the added " ");
        # the prompt then shares the head's tokens and only its tail (often "" or "\n") is tokenized again.
        cuts = [last_word_gap(joined, len(prompt)) for prompt, joined in pairs]
        heads = self._encode_texts([j[:c] for (_, j), c in zip(pairs, cuts)])
        tails = self._encode_texts([j[c:] for (_, j), c in zip(pairs, cuts)]
                                   + [p[c:] for (p, _), c in zip(pairs, cuts)], add_special_tokens=False)
        ids = [head + tail for head, tail in zip(heads, tails[:n])]
        return ids, [len(head) + len(prompt_tail) for head, prompt_tail in zip(heads, tails[n:])]

    def _boundaries_at_space(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
        """One pass (see space_boundary_is_exact): the boundary is the index of the token that starts
        at the added space. Prompts the proof does not cover (empty, ending in " " or "▁") and any
        token that does not start exactly there take the second pass."""
        encodings = _plain_call_backend(self.tokenizer).encode_batch([joined for _, joined in pairs])
        ids = [e.ids for e in encodings]
        boundaries: list[Optional[int]] = []
        for (prompt, _), encoding in zip(pairs, encodings):
            at = None
            if prompt and prompt[-1] not in (" ", METASPACE):
                at = encoding.char_to_token(len(prompt))
                if at is not None and encoding.token_to_chars(at)[0] != len(prompt):
                    at = None
            boundaries.append(at)
        rest = [i for i, b in enumerate(boundaries) if b is None]
        for i, prompt_ids in zip(rest, self._encode_texts([pairs[i][0] for i in rest]) if rest else []):
            boundaries[i] = len(prompt_ids)
        return ids, boundaries

    def encode_batch(self, records: Sequence[PaperRecord]) -> list[Union[Encoded, RecordError]]:
        """All prompts and joined texts of the batch in one go (see ids_and_boundaries)."""
        all_ids, boundaries = self.ids_and_boundaries([self.texts(r) for r in records])
        out: list[Union[Encoded, RecordError]] = []
        for joint_ids, boundary in zip(all_ids, boundaries):
            if boundary >= len(joint_ids):
                out.append(RecordError(
                    "no_response_tokens",
                    f"the prompt alone has {boundary} tokens and prompt + response {len(joint_ids)}: "
                    "by the authors' boundary rule no token is a response token",
                ))
                continue
            roles = np.full(len(joint_ids), Role.PROMPT, dtype=np.uint8)
            roles[boundary:] = Role.RESPONSE
            out.append(Encoded(np.asarray(joint_ids, dtype=np.int64), roles))
        return out


class ChatEncoder:
    """Chat messages → `apply_chat_template` ids with per-token roles (see the module docstring)."""

    _MARKER = "\u2063WIT{}\u2063"  # invisible separator: never merges with template text into a false match

    def __init__(self, tokenizer, chat_template: Optional[str] = None):
        """`chat_template`: None for the tokenizer's own; a name, of one of the tokenizer's named
        templates (as transformers names them) or else of BUILTIN_TEMPLATES; or the Jinja text itself."""
        own = getattr(tokenizer, "chat_template", None)
        # transformers keeps the templates of a tokenizer that ships several as {name: template}.
        self.named_templates: dict[str, str] = own if isinstance(own, dict) else {}
        if chat_template is not None:
            self.template: Optional[str] = self.named_templates.get(chat_template) or BUILTIN_TEMPLATES.get(chat_template, chat_template)
        elif self.named_templates:
            if "default" not in self.named_templates:  # transformers' get_chat_template raises here too
                raise InputError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has several chat templates "
                    f"{sorted(self.named_templates)} and none named 'default': choose one with --chat-template NAME"
                )
            self.template = None  # chosen per record, see template_for
        else:
            self.template = own
        if not self.template and not self.named_templates:
            raise InputError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
                f"name one of {sorted(BUILTIN_TEMPLATES)} or pass a Jinja template file (--chat-template)"
            )
        if _plain_call_backend(tokenizer) is None:
            raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is a slow (Python) tokenizer: "
                             "chat records need a fast one, whose character offsets locate each message's tokens")
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        )
        self._generation_prompts: dict[str, str] = {}  # template -> what add_generation_prompt appends

    def template_for(self, record: ChatRecord) -> str:
        """The template `apply_chat_template` would use for this record: the one chosen, else among the
        tokenizer's named templates "tool_use" for a record with tools (if it has one), else "default"."""
        if self.template is not None:
            return self.template
        if record.tools is not None and "tool_use" in self.named_templates:
            return self.named_templates["tool_use"]
        return self.named_templates["default"]

    def render(self, record: ChatRecord, messages: Optional[list[dict]] = None) -> str:
        """The record rendered by its template, with `messages` (default: its own) and its tools."""
        messages = record.as_dicts() if messages is None else messages
        try:
            return self.tokenizer.apply_chat_template(messages, tools=record.tools, chat_template=self.template_for(record),
                                                      tokenize=False)
        except Exception as e:  # jinja raise_exception(), undefined variables, ...
            raise RecordError("template_error", f"{type(e).__name__}: {e}") from None

    def generation_prompt(self, template: str) -> str:
        """What `add_generation_prompt=True` appends to a conversation under `template` (e.g.
        "<|im_start|>assistant\n"), found once per template on a one-message conversation; "" for a
        template without one (Mistral's) or one that cannot render that conversation."""
        if template not in self._generation_prompts:
            probe = [{"role": "user", "content": "x"}]
            try:
                plain, prompted = (self.tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False,
                                                                      add_generation_prompt=g) for g in (False, True))
            except Exception:  # a template that wants e.g. a system message first: no extension, see response_start
                plain = prompted = ""
            self._generation_prompts[template] = prompted[len(plain):] if prompted.startswith(plain) else ""
        return self._generation_prompts[template]

    def content_spans(self, record: ChatRecord, text: str) -> list[Optional[tuple[int, int]]]:
        """[start, end) of each message's content in `text`, the rendered conversation (None for the
        null content of a tool-call message)."""
        return self._spans_from_one_probe(record, text) or self._spans_message_by_message(record, text)

    def _spans_from_one_probe(self, record: ChatRecord, text: str) -> Optional[list[Optional[tuple[int, int]]]]:
        """One rendering with every content replaced by its own marker; accepted only if putting the
        contents back where the markers are rebuilds `text` exactly (else None: render per message)."""
        messages = record.as_dicts()
        markers = {k: self._MARKER.format(k) for k, m in enumerate(record.messages) if m.content is not None}
        probe = self.render(record, [dict(m, content=markers[k]) if k in markers else m for k, m in enumerate(messages)])
        if any(probe.count(marker) != 1 for marker in markers.values()):
            return None
        spans: list[Optional[tuple[int, int]]] = [None] * len(messages)
        at_text = at_probe = 0
        for start, k in sorted((probe.find(marker), k) for k, marker in markers.items()):
            between = probe[at_probe:start]
            if not text.startswith(between, at_text):
                return None
            at_text += len(between)
            content = record.messages[k].content
            for candidate in (content, content.strip()):  # .strip(): templates that trim content
                if text.startswith(candidate, at_text):
                    spans[k] = (at_text, at_text + len(candidate))
                    at_text += len(candidate)
                    break
            else:
                return None
            at_probe = start + len(markers[k])
        return spans if text[at_text:] == probe[at_probe:] else None

    def _spans_message_by_message(self, record: ChatRecord, text: str) -> list[Optional[tuple[int, int]]]:
        """Each message probed alone: rendered with only its content replaced by a marker. The content
        is where the marker is when the text before it is the same and the content follows verbatim.
        Otherwise the span is what differs between the two renderings (common prefix and suffix
        removed): accepted when the marker alone differs in the probe (the template rendered the
        content changed but in its place: JSON-quoted, upper-cased), or, for an assistant message, when
        the probe's differing text holds the marker (the template moves text of the assistant's own
        content around it: Qwen3 renders reasoning before "</think>" from the content). Anything else
        is refused with `unlocatable_content`."""
        messages = record.as_dicts()
        spans: list[Optional[tuple[int, int]]] = []
        for k, message in enumerate(messages):
            content = record.messages[k].content
            if content is None:
                spans.append(None)
                continue
            marker = self._MARKER.format(k)
            probe = self.render(record, messages[:k] + [dict(message, content=marker)] + messages[k + 1 :])
            start = probe.find(marker)
            if start < 0:
                raise RecordError("unlocatable_content", f"message {k} ({message['role']}): the template does not render its content")
            if probe[:start] == text[:start]:
                verbatim = next((c for c in (content, content.strip()) if text.startswith(c, start)), None)
                if verbatim is not None:
                    spans.append((start, start + len(verbatim)))
                    continue
            prefix, text_end, probe_end = _differing(text, probe)
            substituted = (prefix, probe_end) == (start, start + len(marker))
            moved = record.messages[k].role == "assistant" and prefix <= start and start + len(marker) <= probe_end
            if not (substituted or moved):
                raise RecordError("unlocatable_content", f"message {k} ({message['role']}): the template renders other text "
                                                         "around its content depending on it; its tokens cannot be labelled")
            spans.append((prefix, text_end))
        return spans

    def extras_span(self, record: ChatRecord, k: int, text: str) -> Optional[tuple[int, int]]:
        """[start, end) of what assistant message k's keys other than role, content and name (`tool_calls`,
        `reasoning_content`, ...) add to `text`: the text that differs from a rendering without them
        (common prefix and suffix removed, then surrounding whitespace). None if the template ignores them."""
        messages = record.as_dicts()
        without = {key: value for key, value in messages[k].items() if key in ("role", "content", "name")}
        if without.get("content") is None:
            without["content"] = ""
        probe = self.render(record, messages[:k] + [without] + messages[k + 1 :])
        prefix, end, _ = _differing(text, probe)
        while prefix < end and text[prefix].isspace():  # surrounding whitespace is scaffolding, as for content
            prefix += 1
        while end > prefix and text[end - 1].isspace():
            end -= 1
        return (prefix, end) if end > prefix else None

    def response_start(self, record: ChatRecord, text: str, lo: int, floor: int) -> int:
        """Where assistant text starting at `lo` begins as the model writes it: right after the template's
        generation prompt when that prompt is the last thing in text[floor:lo] (floor: the end of the
        previous message's span), else `lo`. So text a template puts between its generation prompt and
        the content is response (Qwen3's `<think>` opening), as what the model writes when prompted."""
        prompt = self.generation_prompt(self.template_for(record))
        at = text.rfind(prompt, floor, lo) if prompt else -1
        return at + len(prompt) if at >= 0 else lo

    def encode(self, record: ChatRecord) -> Encoded:
        text = self.render(record)
        spans = self.content_spans(record, text)
        tokens = _TokenSpans(_plain_call_backend(self.tokenizer), text)
        roles = np.full(len(tokens.ids), Role.PROMPT, dtype=np.uint8)
        # Finer prompt roles first, so that RESPONSE wins on a token that overlaps both.
        order = sorted(range(len(spans)), key=lambda k: record.messages[k].role == "assistant")
        for k in order:
            message = record.messages[k]
            role = _CHAT_ROLE_CODES[message.role]
            parts = [spans[k]]
            if role == Role.RESPONSE and set(message.template_input) - {"role", "content", "name"}:
                parts.append(self.extras_span(record, k, text))
            parts = [p for p in parts if p is not None and p[1] > p[0]]
            if not parts:
                continue
            # One span from the content's start to its extras' end (or the reverse): the assistant writes what lies between.
            lo, hi = min(p[0] for p in parts), max(p[1] for p in parts)
            if role == Role.RESPONSE:
                others = [span for j, span in enumerate(spans) if j != k and span is not None]
                if any(a < hi and b > lo for a, b in others):
                    raise RecordError("unlocatable_content", f"message {k} (assistant): its rendering reaches into another "
                                                             "message's content; its tokens cannot be labelled")
                lo = self.response_start(record, text, lo, max([b for _, b in others if b <= lo], default=0))
            first, end = tokens.overlapping(lo, hi)
            roles[first:end] = role
            if role == Role.RESPONSE and end < len(roles) and int(tokens.ids[end]) in self.special_ids:
                roles[end] = Role.RESPONSE  # the assistant's end-of-turn token
        if not (roles == Role.RESPONSE).any():
            raise RecordError("no_response_tokens", "no token overlaps an assistant message's content or tool calls "
                                                  "(empty content, and tool calls the template does not render?)")
        return Encoded(tokens.ids, roles)


def _differing(a: str, b: str) -> tuple[int, int, int]:
    """(start, a_end, b_end): a[start:a_end] and b[start:b_end] are where the two texts differ, after
    their longest common prefix and then their longest common suffix (not overlapping that prefix)."""
    limit = min(len(a), len(b))
    start = 0
    while start < limit and a[start] == b[start]:
        start += 1
    suffix = 0
    while suffix < limit - start and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return start, len(a) - suffix, len(b) - suffix


class _TokenSpans:
    """A text's ids (exactly `tokenizer(text, add_special_tokens=False)`, from the Rust backend) and
    which tokens overlap a character span. Token offsets never decrease, so those tokens are one run."""

    def __init__(self, backend, text: str):
        self.text = text
        self._encoding = backend.encode(text, add_special_tokens=False)
        self.ids = np.array(self._encoding.ids, dtype=np.int64)
        self._starts = self._ends = None  # offset arrays, built only if char -> token has no answer

    def overlapping(self, lo: int, hi: int) -> tuple[int, int]:
        """[first, end): the tokens with a character in [lo, hi) (lo < hi)."""
        if self._starts is None:
            first = self._encoding.char_to_token(lo)
            end = self._encoding.char_to_token(hi) if hi < len(self.text) else len(self.ids)
            if first is not None and end is not None:
                if end < len(self.ids) and self._encoding.token_to_chars(end)[0] < hi:
                    end += 1  # the token at hi also holds characters before it
                return first, end
            # A character no token holds (a normalizer dropped it): fall back to the offsets.
            offsets = np.asarray(self._encoding.offsets, dtype=np.int64).reshape(-1, 2)
            self._starts, self._ends = offsets[:, 0], offsets[:, 1]
        return int(np.searchsorted(self._ends, lo, side="right")), int(np.searchsorted(self._starts, hi, side="left"))


def truncation_window(roles: np.ndarray, max_length: int, policy: TruncationPolicy = "keep_response",
                      keep_first: bool = True) -> tuple[int, int, int]:
    """Which tokens of a record to keep in at most `max_length` tokens: (lead, a, b), keeping token
    `lead` and tokens [a, b). Token `lead` is only an input (the context of the first kept target).

    `keep_first` (the record starts with the tokenizer's BOS): lead = 0, so BOS stays in front of a
    left-cut record; otherwise lead = a - 1 and the cut is a plain left cut, ids[a - 1 : b]. An
    untruncated record has lead = 0, a = 1, b = len(roles).
      right:          the paper's plain right truncation ids[:max_length]: lead = 0, a = 1, b = max_length.
      keep_response:  drop prompt tokens from the left until the record fits; if the tokens from the
                      first response token on do not fit either, keep from the first response token
                      and cut the end. A record with a response token keeps at least one.
    """
    n = len(roles)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one input and one target), got {max_length}")
    if n <= max_length:
        return 0, 1, n
    if policy == "right":
        return 0, 1, max_length
    if policy != "keep_response":
        raise ValueError(f"unknown truncation policy {policy!r}; choose one of {TRUNCATION_POLICIES}")
    response = np.flatnonzero(roles == Role.RESPONSE)
    first = int(response[0]) if len(response) else n
    a = max(1, min(n - (max_length - 1), first))
    return (0 if keep_first else a - 1), a, a + max_length - 1


def added_bos_token_id(tokenizer) -> Optional[int]:
    """The tokenizer's BOS id if its plain call puts BOS in front of the text (Llama, Mistral), else
    None (SmolLM2, Qwen: their `bos_token` is a chat marker that a left cut must not keep)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def truncate(encoded: Encoded, max_length: Optional[int], policy: TruncationPolicy,
             added_bos: Optional[int]) -> tuple[Encoded, bool]:
    """(the record cut to `max_length` tokens by `policy`, whether it was cut). A leading
    `added_bos` (added_bos_token_id) is kept in front of a left cut (see truncation_window)."""
    if max_length is None or len(encoded) <= max_length:
        return encoded, False
    keep_first = added_bos is not None and int(encoded.ids[0]) == added_bos
    lead, a, b = truncation_window(encoded.roles, max_length, policy, keep_first)
    keep = np.r_[lead, a:b]
    return Encoded(encoded.ids[keep], encoded.roles[keep]), True


# Named templates for tokenizers that ship none (--chat-template NAME).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
        "{{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
        "{%- endif %}{%- endfor %}"
    ),
}
