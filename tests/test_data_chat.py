"""Chat and ShareGPT records through the preprocessing run, on three real chat templates:
ChatML as SmolLM2 ships it, Llama-3's (Meta-Llama-3-8B-Instruct's template on Meta's Llama-3
tokenizer, from the llama-models package) and Mistral's (Mistral-7B-Instruct-v0.2's template on
Mistral's SentencePiece tokenizer). Ids must equal `apply_chat_template`, and for Llama-3 and Mistral
also the model makers' own encoders; role labels are checked against hand-verified expectations: the
decoded text of each run of equally-labelled tokens.

Three more families' templates (tests/chat_families.py: Gemma 3's, Qwen3's, Llama-3.1's, on tokenizers
built from the real ones here with those families' special tokens) are also checked against an
independent labelling: transformers' `return_assistant_tokens_mask` on the same template with
`{% generation %}` tags around what the assistant writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests import chat_families
from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.testing import llama3, mistral, smollm2

P, R, S, U, T = 0, 1, 2, 3, 4  # role codes: prompt, response, system, user, tool

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
)

SYSTEM_TWO_TURNS = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "About 2.1 million people live in Paris."},
]
ONE_TURN = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
WITH_TOOL = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "tool", "content": "{\"temp_c\": -3}"},
    {"role": "assistant", "content": "It is -3 C in Oslo."},
]


def as_sharegpt(messages: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def preprocess(tmp_path: Path, tokenizer, template: str | None, records: list[dict]):
    """Run the tool on `records`; returns [(ids, roles)] read back with megatron-core's IndexedDataset."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    template_file = None
    if template is not None:
        template_file = tmp_path / "template.jinja"
        template_file.write_text(template)
    prefix = str(tmp_path / "chat")
    report = run(PreprocessConfig([str(data)], prefix, "in-memory", chat_template=template_file and str(template_file), progress=False,
                                  force=True), tokenizer=tokenizer)
    tokens, roles = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_roles")
    return [(tokens[i].tolist(), roles[i].tolist()) for i in range(len(tokens))], report


def runs(tokenizer, ids: list[int], roles: list[int]) -> list[tuple[int, str]]:
    """(role, decoded text) of each maximal run of tokens with the same role."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or roles[i] != roles[start]:
            out.append((roles[start], tokenizer.decode(ids[start:i])))
            start = i
    return out


CASES = {
    "chatml-smollm2": (
        smollm2.load_tokenizer, None,
        [SYSTEM_TWO_TURNS, ONE_TURN, WITH_TOOL],
        [
            [(P, "<|im_start|>system\n"), (S, "You answer in one sentence."), (P, "<|im_end|>\n<|im_start|>user\n"),
             (U, "What is the capital of France?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
             (R, "The capital of France is Paris.<|im_end|>"), (P, "\n<|im_start|>user\n"), (U, "And its population?"),
             (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "About 2.1 million people live in Paris.<|im_end|>"), (P, "\n")],
            # SmolLM2's template adds its default system prompt: scaffolding, not a system message.
            [(P, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"),
             (U, "Name a prime."), (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "Seven.<|im_end|>"), (P, "\n")],
            [(P, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"),
             (U, "Weather in Oslo?"), (P, "<|im_end|>\n<|im_start|>tool\n"), (T, "{\"temp_c\": -3}"),
             (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "It is -3 C in Oslo.<|im_end|>"), (P, "\n")],
        ],
    ),
    "llama3": (
        llama3.load_tokenizer, LLAMA3_TEMPLATE,
        [SYSTEM_TWO_TURNS, ONE_TURN, WITH_TOOL],
        [
            [(P, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"), (S, "You answer in one sentence."),
             (P, "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"), (U, "What is the capital of France?"),
             (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "The capital of France is Paris.<|eot_id|>"),
             (P, "<|start_header_id|>user<|end_header_id|>\n\n"), (U, "And its population?"),
             (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "About 2.1 million people live in Paris.<|eot_id|>")],
            [(P, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"), (U, "Name a prime."),
             (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "Seven.<|eot_id|>")],
            [(P, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"), (U, "Weather in Oslo?"),
             (P, "<|eot_id|><|start_header_id|>tool<|end_header_id|>\n\n"), (T, "{\"temp_c\": -3}"),
             (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "It is -3 C in Oslo.<|eot_id|>")],
        ],
    ),
    "mistral": (
        mistral.load_tokenizer, MISTRAL_TEMPLATE,
        [SYSTEM_TWO_TURNS, ONE_TURN],
        [
            # The template folds the system prompt into the first [INST] block; it is still labelled system.
            [(P, "<s> [INST]"), (S, "You answer in one sentence."), (P, "\n\n"), (U, "What is the capital of France?"),
             (P, "[/INST]"), (R, "The capital of France is Paris.</s>"), (P, "[INST]"), (U, "And its population?"),
             (P, "[/INST]"), (R, "About 2.1 million people live in Paris.</s>")],
            [(P, "<s> [INST]"), (U, "Name a prime."), (P, "[/INST]"), (R, "Seven.</s>")],
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chat_ids_and_roles(tmp_path, case):
    load, template, conversations, expected_runs = CASES[case]
    tokenizer = load()
    records = [{"messages": c} for c in conversations] + [as_sharegpt(c) for c in conversations]
    written, report = preprocess(tmp_path, tokenizer, template, records)
    assert len(written) == len(records) and report.formats == {"chat": len(conversations), "sharegpt": len(conversations)}
    for conversation, (ids, roles), expected in zip(conversations, written, expected_runs):
        assert ids == tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=False)
        assert runs(tokenizer, ids, roles) == expected
    # ShareGPT records are the same conversations: same ids, same roles.
    assert written[len(conversations):] == written[: len(conversations)]


def test_mistral_ids_equal_mistral_common():
    """Mistral's own encoder (mistral-common, fine-tuning mode) gives the same ids as the template path."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from wit_megatron.data.formats import parse_record
    from wit_megatron.data.tokenize import ChatEncoder

    reference = MistralTokenizer.from_file(str(mistral.sentencepiece_path()), mode=ValidationMode.finetuning)
    encoder = ChatEncoder(mistral.load_tokenizer(), MISTRAL_TEMPLATE)
    for messages in (SYSTEM_TWO_TURNS[1:], ONE_TURN):
        expected = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        assert encoder.encode(parse_record({"messages": messages})).ids.tolist() == expected


def test_llama3_ids_equal_metas_chat_format():
    """Meta's own encoder (llama-models' ChatFormat over its tiktoken tokenizer, message by message
    after BOS) gives the same ids as the template path on the converted Hugging Face tokenizer."""
    from llama_models.datatypes import RawMessage, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat

    from wit_megatron.data.formats import parse_record
    from wit_megatron.data.tokenize import ChatEncoder

    meta = llama3.meta_tokenizer()
    chat_format = ChatFormat(meta)
    encoder = ChatEncoder(llama3.load_tokenizer(), LLAMA3_TEMPLATE)
    for messages in (SYSTEM_TWO_TURNS, ONE_TURN):  # ChatFormat names the tool role "ipython": no tool turn here
        expected = [meta.bos_id]
        for message in messages:
            expected += chat_format.encode_message(RawMessage(**message), ToolPromptFormat.json)[0]
        assert encoder.encode(parse_record({"messages": messages})).ids.tolist() == expected


# Qwen2.5's way of rendering tool calls and tool results (its template, minus the tools preamble).
TOOL_CALL_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' }}{{- tool_call.name }}{{- '\\\", \\\"arguments\\\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
)
TOOL_CALLS = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "-3", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "Let me add the wind.",
     "tool_calls": [{"type": "function", "function": {"name": "get_wind", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "5 m/s", "tool_call_id": "call_2"},
    {"role": "assistant", "content": "It is -3 C with 5 m/s wind."},
]


def test_tool_calls_are_response_and_messages_reach_the_template_whole(tmp_path):
    """An assistant's tool calls (null content, or after text) are labelled response like its text;
    every message key (tool_calls, tool_call_id, name) and the role's spelling reach the template, so
    ids equal apply_chat_template on the record's own messages."""
    tokenizer = smollm2.load_tokenizer()
    named = [{"role": "User", "content": "Hi.", "name": "ada"}, {"role": "assistant", "content": "Hello, Ada."}]
    name_template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] }}{%- if m.name is defined %}{{- ' (' + m.name + ')' }}"
                     "{%- endif %}{{- '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}")
    for messages, template, expected in (
        (TOOL_CALLS, TOOL_CALL_TEMPLATE, [
            (P, "<|im_start|>user\n"), (U, "Weather in Oslo?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'),
            (P, "\n<|im_start|>user\n<tool_response>\n"), (T, "-3"), (P, "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
            (R, 'Let me add the wind.\n<tool_call>\n{"name": "get_wind", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'),
            (P, "\n<|im_start|>user\n<tool_response>\n"), (T, "5 m/s"), (P, "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
            (R, "It is -3 C with 5 m/s wind.<|im_end|>"), (P, "\n")]),
        (named, name_template, [
            (P, "<|im_start|>User (ada)\n"), (U, "Hi."), (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "Hello, Ada.<|im_end|>"),
            (P, "\n")]),
    ):
        (written, report) = preprocess(tmp_path, tokenizer, template, [{"messages": messages}])
        ((ids, roles),) = written
        assert ids == tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
        assert runs(tokenizer, ids, roles) == expected


def test_sharegpt_function_call_is_the_assistants():
    from wit_megatron.data.formats import parse_record

    record = parse_record({"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "function_call", "value": '{"name": "w"}'},
                                             {"from": "observation", "value": "-3"}, {"from": "gpt", "value": "-3 C."}]})
    assert [m.role for m in record.messages] == ["user", "assistant", "tool", "assistant"]
    assert record.as_dicts()[1] == {"role": "assistant", "content": '{"name": "w"}'}


@pytest.mark.parametrize("name,case", [("chatml", "chatml-smollm2"), ("llama3", "llama3"), ("mistral", "mistral")])
def test_builtin_templates(tmp_path, name, case):
    """--chat-template NAME: the built-in templates give apply_chat_template's ids and the same labels as
    the real templates above (on a conversation with a system prompt, where ChatML adds no default one)."""
    from wit_megatron.data.tokenize import BUILTIN_TEMPLATES

    load, _, conversations, expected_runs = CASES[case]
    tokenizer = load()
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": SYSTEM_TWO_TURNS}) + "\n")
    prefix = str(tmp_path / "chat")
    run(PreprocessConfig([str(data)], prefix, "in-memory", chat_template=name, progress=False), tokenizer=tokenizer)
    tokens, role_codes = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_roles")  # held: items view their maps
    ids, roles = tokens[0].tolist(), role_codes[0].tolist()
    assert ids == tokenizer.apply_chat_template(SYSTEM_TWO_TURNS, chat_template=BUILTIN_TEMPLATES[name], tokenize=True, return_dict=False)
    assert conversations[0] is SYSTEM_TWO_TURNS and runs(tokenizer, ids, roles) == expected_runs[0]


def test_token_spans_equal_the_offset_overlap_rule():
    """The labels' char -> token lookup (Rust encoding) equals the plain rule "tokens whose offsets
    overlap [lo, hi)" for every span of texts with multi-byte characters (byte-level BPE, and
    SentencePiece's byte fallback, where one character is several tokens)."""
    import numpy as np

    from wit_megatron.data.tokenize import _TokenSpans

    texts = ["Hello 👋🏽 wörld — 東京 is big.\n\n  spaced   out\t", "[INST] ünïcödé 🤖🤖 [/INST] done</s>"]
    for tokenizer in (smollm2.load_tokenizer(), mistral.load_tokenizer()):
        for text in texts:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
            spans = _TokenSpans(tokenizer.backend_tokenizer, text)
            assert spans.ids.tolist() == enc["input_ids"]
            for lo in range(len(text)):
                for hi in range(lo + 1, len(text) + 1):
                    overlap = np.flatnonzero((offsets[:, 0] < hi) & (offsets[:, 1] > lo))
                    assert spans.overlapping(lo, hi) == (int(overlap[0]), int(overlap[-1]) + 1), (text, lo, hi)


# Qwen2.5's template as it renders tools (tool calls aside): the system prompt, or its default one,
# then the tools' JSON schemas, in the first system turn.
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_TEXT = ('\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function '
              'signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", '
              '"description": "The weather in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
              '\n</tools><|im_end|>\n<|im_start|>user\n')
QUESTION = [{"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "The capital of France is Paris."}]


def test_sharegpt_top_level_system_and_tools(tmp_path):
    """LLaMA-Factory-style ShareGPT: a top-level "system" is the conversation's system message (labelled
    system, not replaced by the template's default), a top-level "tools" reaches the template as
    apply_chat_template(tools=...), and the rendered tools are prompt scaffolding."""
    tokenizer = smollm2.load_tokenizer()
    system = "You answer in one sentence."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION[0]["value"]},
                {"role": "assistant", "content": QUESTION[1]["value"]}]
    with_system = {"system": system, "conversations": QUESTION}
    for template, record, tools, expected in (
        (None, with_system, None, [
            (P, "<|im_start|>system\n"), (S, system), (P, "<|im_end|>\n<|im_start|>user\n"), (U, "What is the capital of France?"),
            (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "The capital of France is Paris.<|im_end|>"), (P, "\n")]),
        (QWEN_TOOLS_TEMPLATE, dict(with_system, tools=TOOLS), TOOLS, [
            (P, "<|im_start|>system\n"), (S, system), (P, TOOLS_TEXT), (U, "What is the capital of France?"),
            (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "The capital of France is Paris.<|im_end|>"), (P, "\n")]),
    ):
        (written, report) = preprocess(tmp_path, tokenizer, template, [record, dict(record, conversations=None, messages=messages[1:])])
        assert report.formats == {"sharegpt": 1, "chat": 1} and report.ignored_keys == {}
        (ids, roles), chat = written
        assert ids == tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=True, return_dict=False)
        assert runs(tokenizer, ids, roles) == expected
        assert chat == (ids, roles)  # the same top-level keys on a chat record


def named_templates_tokenizer(templates: dict):
    """SmolLM2's tokenizer with several named chat templates, as transformers loads a tokenizer that ships them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))
    tokenizer.chat_template = templates
    return tokenizer


def test_named_chat_templates_are_chosen_as_transformers_chooses(tmp_path):
    """A tokenizer with {"default": ..., "tool_use": ...}: "default" for records without tools,
    "tool_use" for records with tools, and --chat-template NAME for every record; ids equal
    apply_chat_template with the same choice. Without a "default" the run stops, naming the templates."""
    from wit_megatron.data.sources import InputError

    tokenizer = named_templates_tokenizer({"default": smollm2.load_tokenizer().chat_template, "tool_use": QWEN_TOOLS_TEMPLATE})
    plain = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    records = [{"messages": plain}, {"messages": plain, "tools": TOOLS}]
    for name in (None, "tool_use"):
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        prefix = str(tmp_path / f"named-{name}")
        run(PreprocessConfig([str(data)], prefix, "in-memory", chat_template=name, progress=False), tokenizer=tokenizer)
        tokens, role_codes = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_roles")
        (no_tools, no_tools_roles), (with_tools, with_tools_roles) = [(tokens[i].tolist(), role_codes[i].tolist()) for i in range(2)]
        assert no_tools == tokenizer.apply_chat_template(plain, chat_template=name, tokenize=True, return_dict=False)
        assert with_tools == tokenizer.apply_chat_template(plain, tools=TOOLS, chat_template=name, tokenize=True, return_dict=False)
        qwen_default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        tool_use_runs = [(P, "<|im_start|>system\n" + qwen_default_system + TOOLS_TEXT), (U, "Name a prime."),
                         (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "Seven.<|im_end|>"), (P, "\n")]
        assert runs(tokenizer, with_tools, with_tools_roles) == tool_use_runs
        if name is None:  # SmolLM2's own template, with its default system prompt
            assert runs(tokenizer, no_tools, no_tools_roles)[0] == (
                P, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n")
        else:  # the tool_use template without tools
            assert tokenizer.decode(no_tools).startswith(f"<|im_start|>system\n{qwen_default_system}<|im_end|>\n<|im_start|>user\n")

    ambiguous = named_templates_tokenizer({"a": QWEN_TOOLS_TEMPLATE, "b": QWEN_TOOLS_TEMPLATE})
    with pytest.raises(InputError, match=r"has several chat templates \['a', 'b'\] and none named 'default': choose one with --chat-template NAME"):
        run(PreprocessConfig([str(data)], str(tmp_path / "o"), "in-memory", progress=False), tokenizer=ambiguous)
    with pytest.raises(InputError, match=r"--chat-template 'c' is neither a file nor a built-in template .*, nor one of the tokenizer's templates \(\['a', 'b'\]\)"):
        run(PreprocessConfig([str(data)], str(tmp_path / "o"), "in-memory", chat_template="c", progress=False), tokenizer=ambiguous)


# Reasoning the way Qwen3's template reads it: a "<think>" block at the start of the content, or a
# `reasoning_content` key. Its template keeps it only after the last user turn.
THINKING = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nThe capital is Paris.\n</think>\n\nParis."},
    {"role": "user", "content": "And its population?"},
    {"role": "assistant", "content": "<think>\nAbout 2.1 million in the city proper.\n</think>\n\nAbout 2.1 million."},
]
REASONING_KEY = [{"role": "user", "content": "Name a prime."},
                 {"role": "assistant", "content": "Seven.", "reasoning_content": "Seven is prime."}]
# A tool call (null content), its result (JSON text: Llama-3.1's template JSON-quotes it again), the answer.
CALL = [{"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"temp_c": -3}'},
        {"role": "assistant", "content": "It is -3 C in Oslo."}]
IPYTHON_CALL = [dict(m, role="ipython") if m["role"] == "tool" else m for m in CALL]  # Meta's name for the tool role

QWEN3_TOOLS = ('<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are '
               'provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": '
               '{"name": "get_weather", "description": "The weather in a city.", "parameters": {"type": "object", "properties": '
               '{"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and '
               'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
               '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n')
LLAMA31_HEADER = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: "
                 "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following "
                 "functions, please respond with a JSON for a function call with its proper arguments that best answers the given "
                 'prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
                 "Do not use variables.\n\n" + json.dumps(TOOLS[0], indent=4) + "\n\n")

# family -> [(messages, tools, hand-verified runs)]
FAMILY_CASES = {
    "gemma3": [
        # The system prompt is folded into the first user turn; it keeps its own label.
        (SYSTEM_TWO_TURNS, None, [
            (P, "<s><start_of_turn> user\n"), (S, "You answer in one sentence."), (P, "\n\n"), (U, "What is the capital of France?"),
            (P, "<end_of_turn> \n<start_of_turn> model\n"), (R, "The capital of France is Paris.<end_of_turn>"),
            (P, "\n<start_of_turn> user\n"), (U, "And its population?"), (P, "<end_of_turn> \n<start_of_turn> model\n"),
            (R, "About 2.1 million people live in Paris.<end_of_turn>"), (P, "\n")]),
        (ONE_TURN, None, [(P, "<s><start_of_turn> user\n"), (U, "Name a prime."), (P, "<end_of_turn> \n<start_of_turn> model\n"),
                          (R, "Seven.<end_of_turn>"), (P, "\n")]),
    ],
    "qwen3": [
        # The last answer gets an empty think block: what the model writes after "<|im_start|>assistant\n".
        (SYSTEM_TWO_TURNS, None, [
            (P, "<|im_start|>system\n"), (S, "You answer in one sentence."), (P, "<|im_end|>\n<|im_start|>user\n"),
            (U, "What is the capital of France?"), (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "The capital of France is Paris.<|im_end|>"),
            (P, "\n<|im_start|>user\n"), (U, "And its population?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, "<think>\n\n</think>\n\nAbout 2.1 million people live in Paris.<|im_end|>"), (P, "\n")]),
        # The first turn's reasoning is not rendered (Qwen3's template drops it from history); the last one's is response.
        (THINKING, None, [
            (P, "<|im_start|>user\n"), (U, "What is the capital of France?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, "Paris.<|im_end|>"), (P, "\n<|im_start|>user\n"), (U, "And its population?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, "<think>\nAbout 2.1 million in the city proper.\n</think>\n\nAbout 2.1 million.<|im_end|>"), (P, "\n")]),
        (REASONING_KEY, None, [
            (P, "<|im_start|>user\n"), (U, "Name a prime."), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, "<think>\nSeven is prime.\n</think>\n\nSeven.<|im_end|>"), (P, "\n")]),
        (CALL, TOOLS, [
            (P, QWEN3_TOOLS), (U, "Weather in Oslo?"), (P, "<|im_end|>\n<|im_start|>assistant\n"),
            (R, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'),
            (P, "\n<|im_start|>user\n<tool_response>\n"), (T, '{"temp_c": -3}'), (P, "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
            (R, "<think>\n\n</think>\n\nIt is -3 C in Oslo.<|im_end|>"), (P, "\n")]),
    ],
    "llama3.1": [
        (SYSTEM_TWO_TURNS, None, [
            (P, LLAMA31_HEADER), (S, "You answer in one sentence."), (P, "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
            (U, "What is the capital of France?"), (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
            (R, "The capital of France is Paris.<|eot_id|>"), (P, "<|start_header_id|>user<|end_header_id|>\n\n"), (U, "And its population?"),
            (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "About 2.1 million people live in Paris.<|eot_id|>")]),
        (ONE_TURN, None, [
            (P, LLAMA31_HEADER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"), (U, "Name a prime."),
            (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "Seven.<|eot_id|>")]),
        # The tool result is rendered JSON-quoted (its template applies tojson to a string): labelled tool all the same.
        (IPYTHON_CALL, TOOLS, [
            (P, LLAMA31_TOOLS), (U, "Weather in Oslo?"), (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
            (R, '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'), (P, "<|start_header_id|>ipython<|end_header_id|>\n\n"),
            (T, '"{\\"temp_c\\": -3}"'), (P, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), (R, "It is -3 C in Oslo.<|eot_id|>")]),
    ],
}


@pytest.mark.parametrize("family", chat_families.FAMILIES)
def test_family_templates_against_the_assistant_tokens_mask(tmp_path, family):
    """Gemma 3 (system folded into the first user turn, role `model`), Qwen3 (<think> blocks, reasoning
    dropped from earlier turns, `reasoning_content`, tool calls and results) and Llama-3.1 (date/knowledge
    header, tools in the first user turn, `ipython` results) through the preprocessing run with the
    tokenizer's own template: ids equal apply_chat_template; the response labels equal, token for token,
    transformers' assistant mask from the `{% generation %}`-tagged template (which renders the same
    text); every run of labels equals the hand-verified one. Checked against the labelling before it
    learnt where the generation prompt ends, what an assistant's other keys render and content a
    template moves or quotes: Qwen3's `reasoning_content` was silently labelled prompt (10 tokens off
    the mask), as its empty think block (5), a `<think>` block in the content was refused, and so were
    Llama-3.1's `ipython` role and its JSON-quoted tool results."""
    tokenizer = chat_families.tokenizer(family)
    generation_template = chat_families.template(family, generation=True)
    cases = FAMILY_CASES[family]
    written, report = preprocess(tmp_path, tokenizer, None, [dict(messages=m, **({"tools": t} if t else {})) for m, t, _ in cases])
    assert len(written) == len(cases)
    for (messages, tools, expected), (ids, roles) in zip(cases, written):
        assert ids == tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
        assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, chat_template=generation_template)
        mask = tokenizer.apply_chat_template(messages, tools=tools, chat_template=generation_template, return_dict=True,
                                             return_assistant_tokens_mask=True)
        assert mask["input_ids"] == ids and sum(mask["assistant_masks"]) > 0
        assert [int(r == R) for r in roles] == mask["assistant_masks"]
        assert runs(tokenizer, ids, roles) == expected


def test_family_templates_refuse_what_they_cannot_render():
    """What a template drops or refuses is a refused record with the reason, not a mislabelled one:
    Gemma 3's template has no tool role; Llama-3.1's drops an assistant's text next to a tool call."""
    from wit_megatron.data.formats import RecordError, parse_record
    from wit_megatron.data.tokenize import ChatEncoder

    gemma = ChatEncoder(chat_families.tokenizer("gemma3"))
    with pytest.raises(RecordError, match="^template_error: TemplateError: Conversation roles must alternate"):
        gemma.encode(parse_record({"messages": WITH_TOOL}))
    llama = ChatEncoder(chat_families.tokenizer("llama3.1"))
    text_and_call = [CALL[0], dict(CALL[1], content="Let me look."), *CALL[2:]]
    with pytest.raises(RecordError, match=r"^unlocatable_content: message 1 \(assistant\): the template does not render its content$"):
        llama.encode(parse_record({"messages": text_and_call}))


def test_content_the_template_rewrites_in_place_keeps_its_label():
    """A template that renders a content changed but in its place (`| upper`) labels the changed text
    with the message's role; one that renders it changed and other text around it depending on it
    (here its length) is refused. (Text after a content rendered verbatim is scaffolding either way.)"""
    from wit_megatron.data.formats import RecordError, parse_record
    from wit_megatron.data.tokenize import BUILTIN_TEMPLATES, ChatEncoder

    tokenizer = smollm2.load_tokenizer()
    upper = ChatEncoder(tokenizer, BUILTIN_TEMPLATES["chatml"].replace("message['content']", "message['content'] | upper"))
    encoded = upper.encode(parse_record({"messages": ONE_TURN}))
    assert runs(tokenizer, encoded.ids.tolist(), encoded.roles.tolist()) == [
        (P, "<|im_start|>user\n"), (U, "NAME A PRIME."), (P, "<|im_end|>\n<|im_start|>assistant\n"), (R, "SEVEN.<|im_end|>"), (P, "\n")]
    counted = ChatEncoder(tokenizer, BUILTIN_TEMPLATES["chatml"].replace(
        "message['content']", "(message['content'] | upper) + ' (' + (message['content'] | length | string) + ' characters)'"))
    with pytest.raises(RecordError, match=r"^unlocatable_content: message 0 \(user\): the template renders other text around its content"):
        counted.encode(parse_record({"messages": ONE_TURN}))

