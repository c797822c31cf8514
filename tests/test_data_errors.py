"""Bad input: every malformed case stops the run with a message naming file, line and what is wrong,
or, with on_error="skip", is counted under its reason in the report (nothing dropped silently)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from wit_megatron.data.indexed import WITIndexedData
from wit_megatron.data.preprocess import PreprocessConfig, PreprocessError, main, run
from wit_megatron.data.sources import InputError
from wit_megatron.data.tokenize import BUILTIN_TEMPLATES
from wit_megatron.testing import smollm2

GOOD = {"prompt": "Add 2 and 3.", "response": "5"}
LONG_PROMPT = {"prompt": "word " * 200, "response": "done"}
MERGED = {"prompt": "Hi \n  ", "response": "  x"}

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
    ("system twice", json.dumps({"system": "a", "conversations": [{"from": "system", "value": "b"}, {"from": "human", "value": "c"},
                                                                  {"from": "gpt", "value": "d"}]}),
     "bad_structure", "record has a top-level 'system' and conversations[0] is a system message too", {}),
    ("system not a string", json.dumps({"system": 1, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "not_a_string", "record's 'system' is a int", {}),
    ("tools not a list", json.dumps({"tools": '[{"name": "f"}]', "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "bad_structure", "'tools' must be a list of tool definitions, got a str", {}),
    ("tool_calls not a list", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": "f()"}]}),
     "bad_structure", "messages[1]'s 'tool_calls' must be a list on an assistant message", {}),
    ("template raises", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "template_error", "roles must alternate",
     {"chat_template": "mistral"}),
    ("template renders text depending on the content", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "unlocatable_content", "message 0 (user): the template renders other text around its content depending on it", {"chat_template": "counted"}),
    ("response truncated away", json.dumps(LONG_PROMPT), "no_response_tokens", "truncation to 64 tokens (right) left no response token",
     {"max_length": 64, "truncation": "right"}),
    # SmolLM2's own template does not render tool calls, and the content is empty: nothing is the assistant's.
    ("unrendered tool call", json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}),
     "no_response_tokens", "no token overlaps an assistant message's content or tool calls", {}),
    # The authors' boundary rule: the response's leading spaces merge into the prompt's trailing
    # whitespace token, so prompt + response has no more tokens than the prompt (see test below).
    ("response merged into the prompt", json.dumps(MERGED), "no_response_tokens",
     "the prompt alone has 3 tokens and prompt + response 3: by the authors' boundary rule no token is a response token",
     {"append_eos": False}),
    ("one token", json.dumps({"prompt": "", "response": "a"}), "too_short", "1 token(s)", {"append_eos": False}),
]


def preprocess(config: PreprocessConfig):
    return run(config, tokenizer=smollm2.load_tokenizer())  # loaded once for all cases


def write(tmp_path: Path, bad_line: str, extra: dict) -> tuple[str, dict]:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), bad_line, json.dumps(GOOD)]) + "\n")
    extra = dict(extra)
    if extra.get("chat_template") == "counted":  # the content upper-cased, and its length after it
        template = tmp_path / "counted.jinja"
        template.write_text(BUILTIN_TEMPLATES["chatml"].replace("message['content']", "(message['content'] | upper) + ' [' + (message['content'] | length | string) + ']'"))
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
        assert not list(tmp_path.glob(".*"))  # neither the staging directory nor the workers' parts in it


def test_bad_files(tmp_path):
    tok = str(smollm2.tokenizer_dir())
    not_array = tmp_path / "obj.json"
    not_array.write_text('{"prompt": "a", "response": "b"}')
    with pytest.raises(InputError, match=r"obj.json: a .json input must hold a JSON array of records, found a dict"):
        preprocess(PreprocessConfig([str(not_array)], str(tmp_path / "o"), tok, progress=False))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a",\n "response": }]')
    with pytest.raises(InputError, match=r"broken.json:3:14: not valid JSON"):
        preprocess(PreprocessConfig([str(broken)], str(tmp_path / "o"), tok, progress=False))
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\n")
    with pytest.raises(InputError, match=r"data.csv: unsupported input"):
        preprocess(PreprocessConfig([str(csv)], str(tmp_path / "o"), tok, progress=False))
    with pytest.raises(InputError, match=r"'no/such/file.jsonl' is neither a file nor a directory, and `datasets` cannot load it offline"):
        preprocess(PreprocessConfig(["no/such/file.jsonl"], str(tmp_path / "o"), tok, progress=False))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"prompt": "café", "response": "b"}]'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.json: not UTF-8 \(byte 0xe9 at offset 16\)"):
        preprocess(PreprocessConfig([str(latin1)], str(tmp_path / "o"), tok, progress=False))
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(("\n".join([json.dumps(GOOD)] * 2000) + "\n").encode())[:300])
    with pytest.raises(InputError, match=r"cut.jsonl.gz: cannot be read after line \d+: "):
        preprocess(PreprocessConfig([str(gz)], str(tmp_path / "o"), tok, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["obj.json", "broken.json", "data.csv", "latin1.json", "cut.jsonl.gz"])


def test_chat_records_with_a_tokenizer_without_template_exit_2(tmp_path, capsys):
    """A chat record for a tokenizer that has no chat template, and no --chat-template: a named input
    error (exit 2), not a traceback, and no output files."""
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(tok_dir))
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    code = main(["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tok_dir), "--no-progress"])
    assert code == 2
    assert "has no chat template: name one of ['chatml', 'llama3', 'mistral'] or pass a Jinja template file" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))


def test_a_line_that_is_not_utf8_is_that_records_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), b'{"prompt": "caf\xe9", "response": "b"}', json.dumps(GOOD).encode()]) + b"\n")
    tok = str(smollm2.tokenizer_dir())
    with pytest.raises(PreprocessError, match=rf"^{path}:2: malformed_json: not UTF-8: byte 0xe9 at column 16"):
        preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), tok, progress=False))
    report = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), tok, on_error="skip", progress=False))
    assert (report.records_read, report.records_written, report.skipped) == (3, 2, {"malformed_json": 1})


def test_a_failed_run_leaves_no_files_and_the_previous_dataset_intact(tmp_path):
    tok = str(smollm2.tokenizer_dir())
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD) + "\n")
    preprocess(PreprocessConfig([str(good)], str(tmp_path / "out"), tok, progress=False))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    path, _ = write(tmp_path, "{oops", {})  # the first record is written before the second stops the run
    for workers in (1, 2):
        with pytest.raises(PreprocessError):
            preprocess(PreprocessConfig([path], str(tmp_path / "out"), tok, workers=workers, chunk_size=1, progress=False,
                                        force=True))
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "data.jsonl"} == files
    assert len(WITIndexedData(str(tmp_path / "out"))) == 1


def test_cli_exit_code_and_message(tmp_path, capsys):
    path, _ = write(tmp_path, "{oops", {})
    code = main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(smollm2.tokenizer_dir()), "--no-progress"])
    assert code == 1
    assert f"error: {path}:2: malformed_json" in capsys.readouterr().err
    code = main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(smollm2.tokenizer_dir()),
                 "--no-progress", "--on-error", "skip"])
    assert code == 0
    assert "skipped 1 {'malformed_json': 1}" in capsys.readouterr().err
    code = main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o2"), "--tokenizer",
                 str(smollm2.tokenizer_dir()), "--no-progress"])
    assert code == 2
    assert "error: 'missing.jsonl' is neither a file nor a directory" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    code = main(["--input", path, "--output-prefix", str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "no-tokenizer"), "--no-progress"])
    assert code == 2
    assert f"error: tokenizer '{tmp_path / 'no-tokenizer'}' cannot be loaded" in capsys.readouterr().err
    assert not list(tmp_path.glob("o2*")) and not list(tmp_path.glob(".o2*"))


def test_the_boundary_rule_itself_can_leave_no_response_token():
    """MERGED by the authors' formula (--no-append-eos): p = "Hi \\n " (one trailing space cut),
    tokenizer(p) = "Hi", " \\n", " " and tokenizer(p + " " + r) = "Hi", " \\n   ", " x": as many
    tokens, so ids[boundary:] is empty."""
    from wit_megatron.data.formats import PaperRecord
    from wit_megatron.data.tokenize import PaperEncoder

    tokenizer = smollm2.load_tokenizer()
    prompt = MERGED["prompt"][:-1]
    ids = tokenizer(prompt + " " + MERGED["response"]).input_ids
    boundary = len(tokenizer(prompt).input_ids)
    assert [tokenizer.decode([i]) for i in ids] == ["Hi", " \n   ", " x"] and boundary == 3 == len(ids)
    # With the EOS appended the same record keeps one response token: the EOS.
    (encoded,) = PaperEncoder(tokenizer).encode_batch([PaperRecord(**MERGED)])
    assert [tokenizer.decode([i]) for i in encoded.ids] == ["Hi", " \n   ", " x", "<|im_end|>"] and encoded.roles.tolist() == [0, 0, 0, 1]


def test_ignored_keys_are_counted(tmp_path):
    """Keys no format reads (ids, sources, ShareGPT turns' weights) are named in the report with the
    number of written records that had them; null values hold nothing and are not counted."""
    records = [
        dict(GOOD, id=7, source=None),
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": 8, "source": "web"},
        {"conversations": [{"from": "human", "value": "a", "weight": 0}, {"from": "gpt", "value": "b", "weight": 1}], "id": 9},
        {"prompt": "a", "response": "b", "messages": [{"role": "user", "content": "c"}]},  # paper with --format paper
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    report = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), "in-memory", progress=False))
    assert report.records_written == 3 and report.formats == {"paper": 1, "chat": 1, "sharegpt": 1}
    assert report.ignored_keys == {"id": 3, "source": 1, "conversations[].weight": 1}
    assert json.loads((tmp_path / "out.report.json").read_text())["ignored_keys"] == report.ignored_keys
    path.write_text(json.dumps(records[3]) + "\n")
    report = preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), "in-memory", format="paper", progress=False,
                                         force=True))
    assert (report.formats, report.ignored_keys) == ({"paper": 1}, {"messages": 1})


def test_error_locations_in_json_parquet_and_saved_datasets(tmp_path):
    """A malformed record is named FILE[INDEX] in a .json array and NAME#row INDEX in Parquet and
    saved `datasets` inputs (0-based, as the reader counts)."""
    import datasets

    records = [GOOD, {"prompt": "a", "response": None}, GOOD]
    array = tmp_path / "data.json"
    array.write_text(json.dumps(records))
    parquet, saved = tmp_path / "data.parquet", tmp_path / "saved"
    datasets.Dataset.from_list(records).to_parquet(str(parquet))
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    for path, location in ((array, f"{array}[1]"), (parquet, f"{parquet}#row 1"), (saved, f"{saved}#row 1")):
        with pytest.raises(PreprocessError) as err:
            preprocess(PreprocessConfig([str(path)], str(tmp_path / "out"), "in-memory", progress=False))
        assert str(err.value).startswith(f"{location}: missing_field: record has no 'response'\n"), str(err.value)
