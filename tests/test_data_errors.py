"""Bad input: every malformed case stops the run with a message naming file, line and what is wrong,
or, with on_error="skip", is counted under its reason in the report (nothing dropped silently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wit_megatron.data.preprocess import PreprocessConfig, PreprocessError, main, run
from wit_megatron.data.tokenize import BUILTIN_TEMPLATES
from wit_megatron.testing import smollm2

GOOD = {"prompt": "Add 2 and 3.", "response": "5"}
LONG_PROMPT = {"prompt": "word " * 200, "response": "done"}

# (case, bad JSONL line, expected reason, text the message must contain, extra config)
CASES = [
    ("malformed json", '{"prompt": "a", "response": }', "malformed_json", "Expecting value at column 29", {}),
    ("not an object", "[1, 2]", "not_an_object", "expected a JSON object, got list", {}),
    ("unknown format", json.dumps({"text": "hi"}), "unknown_format", "keys (text)", {}),
    ("missing response", json.dumps({"prompt": "a"}), "missing_field", "record has no 'response'", {}),
    ("null prompt", json.dumps({"prompt": None, "response": "b"}), "missing_field", "record has no 'prompt'", {}),
    ("number prompt", json.dumps({"prompt": 5, "response": "b"}), "not_a_string", "'prompt' is a int", {}),
    ("list content", json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}]}),
     "not_a_string", "messages[0]'s 'content' is a list", {}),
    ("number role", json.dumps({"messages": [{"role": 1, "content": "a"}]}), "not_a_string", "messages[0]'s 'role' is a int", {}),
    ("empty response", json.dumps({"prompt": "a", "response": "  "}), "empty_response", "'response' is empty", {}),
    ("empty assistant", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
     "empty_response", "messages[1] is an assistant message with empty content", {}),
    ("unknown role", json.dumps({"messages": [{"role": "narrator", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "unknown_role", "messages[0] has role 'narrator'", {}),
    ("unknown sharegpt speaker", json.dumps({"conversations": [{"from": "bot", "value": "a"}]}), "unknown_role", "conversations[0] has from 'bot'", {}),
    ("no assistant", json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no_response", "has no assistant message", {}),
    ("messages not a list", json.dumps({"messages": "hello"}), "bad_structure", "'messages' must be a non-empty list, got a str", {}),
    ("empty messages", json.dumps({"messages": []}), "bad_structure", "got an empty list", {}),
    ("message not an object", json.dumps({"conversations": ["hi"]}), "bad_structure", "conversations[0] is a str", {}),
    ("template raises", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "template_error", "roles must alternate",
     {"chat_template": "mistral"}),
    ("template rewrites content", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "unlocatable_content", "message 0 (user): content not found", {"chat_template": "upper"}),
    ("response truncated away", json.dumps(LONG_PROMPT), "no_response_tokens", "truncation to 64 tokens (right) left no response token",
     {"max_length": 64, "truncation": "right"}),
    ("one token", json.dumps({"prompt": "", "response": "a"}), "too_short", "1 token(s)", {"append_eos": False}),
]


def preprocess(config: PreprocessConfig):
    return run(config, tokenizer=smollm2.load_tokenizer())  # loaded once for all cases


def write(tmp_path: Path, bad_line: str, extra: dict) -> tuple[str, dict]:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), bad_line, json.dumps(GOOD)]) + "\n")
    extra = dict(extra)
    if extra.get("chat_template") == "upper":
        template = tmp_path / "upper.jinja"
        template.write_text(BUILTIN_TEMPLATES["chatml"].replace("message['content']", "message['content'] | upper"))
        extra["chat_template"] = str(template)
    return str(path), extra


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_record_is_named_or_counted(tmp_path, case):
    _, line, reason, text, extra = next(c for c in CASES if c[0] == case)
    path, extra = write(tmp_path, line, extra)
    tok = str(smollm2.tokenizer_dir())
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig([path], str(tmp_path / "out"), tok, progress=False, **extra))
    message = str(err.value)
    assert message.startswith(f"{path}:2: {reason}: ") and text in message, message
    assert "--on-error skip" in message

    report = preprocess(PreprocessConfig([path], str(tmp_path / "out"), tok, on_error="skip", progress=False, **extra))
    assert report.records_read == 3 and report.records_written == 2
    assert report.skipped == {reason: 1}
    assert report.error_examples == [message.split("\n")[0]]
    saved = json.loads((tmp_path / "out.report.json").read_text())
    assert saved["skipped"] == {reason: 1} and reason in saved["skipped_reasons"]


@pytest.mark.parametrize("workers", [1, 2])
def test_all_cases_in_one_file_are_each_counted(tmp_path, workers):
    lines = [json.dumps(GOOD)] + [c[1] for c in CASES if not c[4]] + ["", json.dumps(GOOD)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tok = str(smollm2.tokenizer_dir())
    report = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), tok, on_error="skip", workers=workers,
                                         chunk_size=3, progress=False))
    expected: dict[str, int] = {}
    for c in CASES:
        if not c[4]:
            expected[c[2]] = expected.get(c[2], 0) + 1
    assert report.skipped == expected
    assert report.records_read == report.records_written + sum(expected.values()) == len(lines) - 1
    assert report.blank_lines == 1
    if workers > 1:  # the first bad record stops a run without --on-error skip, worker parts removed
        with pytest.raises(PreprocessError, match=rf"^{path}:2: "):
            preprocess(PreprocessConfig([str(path)], str(tmp_path / "raised"), tok, workers=workers, chunk_size=3, progress=False))
        assert not list(tmp_path.glob(".*parts-*"))


def test_bad_files(tmp_path):
    tok = str(smollm2.tokenizer_dir())
    not_array = tmp_path / "obj.json"
    not_array.write_text('{"prompt": "a", "response": "b"}')
    with pytest.raises(ValueError, match=r"obj.json: a .json input must hold a JSON array of records, found a dict"):
        preprocess(PreprocessConfig([str(not_array)], str(tmp_path / "o"), tok, progress=False))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a",\n "response": }]')
    with pytest.raises(ValueError, match=r"broken.json:3:14: not valid JSON"):
        preprocess(PreprocessConfig([str(broken)], str(tmp_path / "o"), tok, progress=False))
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\n")
    with pytest.raises(ValueError, match=r"data.csv: unsupported input"):
        preprocess(PreprocessConfig([str(csv)], str(tmp_path / "o"), tok, progress=False))
    with pytest.raises(FileNotFoundError, match=r"'no/such/file.jsonl' is neither a file nor a directory"):
        preprocess(PreprocessConfig(["no/such/file.jsonl"], str(tmp_path / "o"), tok, progress=False))


def test_cli_exit_code_and_message(tmp_path, capsys):
    path, _ = write(tmp_path, "{oops", {})
    code = main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(smollm2.tokenizer_dir()), "--no-progress"])
    assert code == 1
    assert f"error: {path}:2: malformed_json" in capsys.readouterr().err
    code = main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(smollm2.tokenizer_dir()),
                 "--no-progress", "--on-error", "skip"])
    assert code == 0
    assert "skipped 1 {'malformed_json': 1}" in capsys.readouterr().err
