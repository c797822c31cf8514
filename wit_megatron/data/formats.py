"""Instruction records: recognise and validate the three accepted record formats.

    paper     {"prompt": str, "response": str}                       the WIT paper's format
    chat      {"messages": [{"role": ..., "content": str}, ...]}     roles system/user/assistant/tool (ipython: tool)
    sharegpt  {"conversations": [{"from": ..., "value": str}, ...]}  mapped onto chat

Chat messages reach the chat template exactly as given, every key included (`name`, `tool_call_id`,
`tool_calls`, ...), so ids equal `apply_chat_template(messages)`; the role is matched case-insensitively
only to label tokens. An assistant message with `tool_calls` may have null or no content.

Top-level keys next to messages/conversations, as ShareGPT exports (LLaMA-Factory's) have them:
    system    a string: a leading system message ("" or null: none); a conflict with a conversation
              that starts with its own system message is a `bad_structure` error
    tools     a list of tool definitions, passed on as apply_chat_template(messages, tools=tools)
Every other key is ignored, and `ignored_keys` names it so the report can count it (nothing vanishes
unseen); so are the keys of ShareGPT turns other than from/value, as "conversations[].KEY".

Every record either parses or raises `RecordError` with a `reason` (the key it is counted under in the
preprocessing report, see REASONS) and a message saying what is wrong.
Empty response text is an error (there would be nothing to learn); empty prompt-side text is kept,
as the authors' code keeps an empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

FormatName = Literal["auto", "paper", "chat", "sharegpt"]
FORMATS = ("auto", "paper", "chat", "sharegpt")

# Every reason a record can be refused for, and what it means (the report's "skipped" keys).
REASONS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "unknown_format": "the record has none of the keys prompt+response, messages, conversations",
    "missing_field": "a required key is absent or null",
    "not_a_string": "a text field (or a role) is not a string",
    "bad_structure": "messages/conversations is not a non-empty list of objects, tool_calls or tools is malformed, "
                     "or a top-level system prompt conflicts with a leading system message",
    "unknown_role": "a message role that is not system, user, assistant or tool (or a ShareGPT alias)",
    "empty_response": "the response text (or an assistant message) is empty or whitespace only",
    "no_response": "a conversation without any assistant message",
    "no_response_tokens": "after tokenization and truncation no response token is left",
    "too_short": "fewer than 2 tokens: no target to learn",
    "template_error": "the chat template failed to render the conversation",
    "unlocatable_content": "a message's content cannot be found in the rendered chat template, or the template renders "
                           "text around it that depends on it",
}

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Other role names chat records use, and the role their tokens are labelled with. The record keeps its
# own name: the template receives it (Llama-3.1's renders tool results as `ipython`, its own name for them).
CHAT_ROLE_ALIASES = {"ipython": "tool"}

# ShareGPT speaker names seen in public ShareGPT-style sets, mapped to chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",  # the assistant's call, as text
    "function_response": "tool",
    "observation": "tool",
}


class RecordError(ValueError):
    """A record that cannot be used. `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # workers send these back and forth: rebuild from both fields, not from args
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class PaperRecord:
    prompt: str
    response: str


@dataclass(frozen=True)
class Message:
    role: str  # one of CHAT_ROLES: what the message's tokens are labelled
    content: Optional[str]  # None only for an assistant message with tool_calls
    template_input: dict  # the message as the chat template receives it


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]
    tools: Optional[list] = None  # the record's top-level tools, for apply_chat_template(tools=...)

    def as_dicts(self) -> list[dict]:
        """The messages as `apply_chat_template` receives them."""
        return [dict(m.template_input) for m in self.messages]


Record = Union[PaperRecord, ChatRecord]


# The top-level keys each format reads.
FORMAT_KEYS = {"paper": ("prompt", "response"), "chat": ("messages", "system", "tools"), "sharegpt": ("conversations", "system", "tools")}


def ignored_keys(obj: dict, fmt: str) -> list[str]:
    """The keys of a parsed record that format `fmt` does not read (null values hold nothing and are
    not named): top-level keys, and for ShareGPT the keys of its turns other than from/value, as
    "conversations[].KEY"."""
    ignored = [key for key, value in obj.items() if key not in FORMAT_KEYS[fmt] and value is not None]
    if fmt == "sharegpt":
        turn_keys = {key for turn in obj["conversations"] for key, value in turn.items()
                     if key not in ("from", "value") and value is not None}
        ignored += [f"conversations[].{key}" for key in sorted(turn_keys)]
    return ignored


def detect_format(obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "prompt" in obj or "response" in obj:
        return "paper"
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise RecordError("unknown_format", f"cannot tell the format from the keys ({keys}); expected prompt+response, messages or conversations")


def parse_record(obj: Any, fmt: FormatName = "auto") -> Record:
    """Validate one decoded record and return it as a PaperRecord or ChatRecord."""
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt == "paper":
        return _parse_paper(obj)
    if fmt == "chat":
        return _parse_messages(obj, "messages", "role", "content", dict({r: r for r in CHAT_ROLES}, **CHAT_ROLE_ALIASES))
    if fmt == "sharegpt":
        return _parse_messages(obj, "conversations", "from", "value", SHAREGPT_ROLES)
    raise ValueError(f"unknown record format {fmt!r}; choose one of {FORMATS}")


def _text(obj: dict, key: str, where: str) -> str:
    if key not in obj or obj[key] is None:
        raise RecordError("missing_field", f"{where} has no '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("not_a_string", f"{where}'s '{key}' is a {type(value).__name__}, not a string")
    return value


def _parse_paper(obj: dict) -> PaperRecord:
    prompt = _text(obj, "prompt", "record")
    response = _text(obj, "response", "record")
    if not response.strip():
        raise RecordError("empty_response", "record's 'response' is empty")
    return PaperRecord(prompt, response)


def _parse_messages(obj: dict, list_key: str, role_key: str, text_key: str, role_map: dict[str, str]) -> ChatRecord:
    items = obj.get(list_key)
    if items is None:
        raise RecordError("missing_field", f"record has no '{list_key}'")
    if not isinstance(items, list) or not items:
        raise RecordError("bad_structure", f"'{list_key}' must be a non-empty list, got {_describe(items)}")
    messages = []
    for i, item in enumerate(items):
        where = f"{list_key}[{i}]"
        if not isinstance(item, dict):
            raise RecordError("bad_structure", f"{where} is a {type(item).__name__}, not an object")
        name = _text(item, role_key, where)
        role = role_map.get(name.lower())
        if role is None:
            raise RecordError("unknown_role", f"{where} has {role_key} {name!r}; known: {sorted(role_map)}")
        tool_calls = item.get("tool_calls") if list_key == "messages" else None
        if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
            raise RecordError("bad_structure", f"{where}'s 'tool_calls' must be a list on an assistant message")
        if tool_calls and item.get(text_key) is None:
            content = None  # a pure tool call: its rendering is the response
        else:
            content = _text(item, text_key, where)
            if role == "assistant" and not content.strip() and not tool_calls:
                raise RecordError("empty_response", f"{where} is an assistant message with empty content")
        template_input = item if list_key == "messages" else {"role": role, "content": content}
        messages.append(Message(role, content, template_input))
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("no_response", f"'{list_key}' has no assistant message ({len(messages)} messages)")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("not_a_string", f"record's 'system' is a {type(system).__name__}, not a string")
    if system:  # "" is no system prompt, as LLaMA-Factory reads it
        if messages[0].role == "system":
            raise RecordError("bad_structure", f"record has a top-level 'system' and {list_key}[0] is a system message "
                                               "too: which one is the system prompt?")
        messages.insert(0, Message("system", system, {"role": "system", "content": system}))
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RecordError("bad_structure", f"'tools' must be a list of tool definitions, got {_describe(tools)}")
    return ChatRecord(tuple(messages), tools)


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else f"a {type(value).__name__}"
