"""wit-preprocess-data on bad input (docs/reliability.md): no silent success (a run that writes no record
is an error saying why), numeric options refused at parse time, an existing dataset replaced only with
--force and only if this tool wrote it, no output file over an input. Each case leaves the file system
exactly as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability import Case, check
from wit_megatron.data.preprocess import PreprocessConfig, main, run
from wit_megatron.testing import smollm2

GOOD = {"prompt": "Add 2 and 3.", "response": "5"}
EMPTY_RESPONSE = {"prompt": "Say nothing.", "response": " "}
TOOL = "wit-preprocess-data"
COMMON = ("--tokenizer", "{tok}", "--no-progress")


def case(what: str, argv: tuple, exit: int, says: str) -> Case:
    return Case(TOOL, what, (*argv, *COMMON), exit, says)


# name -> (case, what the test's directory holds besides data.jsonl with two good records)
TABLE = {
    "empty_input": (case("an input without records (blank lines only)", ("--input", "{ws}/empty.jsonl", "--output-prefix",
                                                                         "{ws}/out"), 1,
                         "{ws}/empty.jsonl: no records to write: the input holds none (2 blank line(s)); nothing was written"),
                    "empty"),
    "all_skipped": (case("every record skipped (--on-error skip)", ("--input", "{ws}/blank_responses.jsonl", "--output-prefix",
                                                                    "{ws}/out", "--on-error", "skip"), 1,
                         "{ws}/blank_responses.jsonl: none of the 2 records could be written: skipped 2 empty_response "
                         "(the response text (or an assistant message) is empty or whitespace only); nothing was written "
                         "{ws}/blank_responses.jsonl:1: empty_response: record's 'response' is empty"), "blank_responses"),
    "chunk_size_0": (case("--chunk-size 0 (wrote an empty dataset)", ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out",
                                                                     "--chunk-size", "0"), 2,
                          "argument --chunk-size: must be >= 1, got 0"), None),
    "max_length_0": (case("--max-length 0", ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out", "--max-length", "0"),
                          2, "argument --max-length: must be >= 2, got 0"), None),
    "max_length_negative": (case("--max-length -5", ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out",
                                                     "--max-length=-5"), 2, "argument --max-length: must be >= 2, got -5"), None),
    "workers_0": (case("--workers 0", ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out", "--workers", "0"), 2,
                       "argument --workers: must be >= 1, got 0"), None),
    "existing": (case("a dataset exists at the prefix, no --force (was replaced silently)",
                      ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out"), 2,
                      "--output-prefix {ws}/out holds a dataset (out_tokens.bin, out_tokens.idx, out_roles.bin, out_roles.idx, "
                      "out.report.json, out.meta.json); pass --force to replace it"), "dataset"),
    "force_foreign": (case("--force over files this tool did not write", ("--input", "{ws}/data.jsonl", "--output-prefix",
                                                                         "{ws}/out", "--force"), 2,
                           "--force replaces only a dataset this tool wrote; out_tokens.bin at --output-prefix {ws}/out are "
                           "not one: choose another prefix, or remove them yourself"), "foreign"),
    "output_is_input": (case("an output file would be the input", ("--input", "{ws}/out.report.json", "--output-prefix",
                                                                   "{ws}/out", "--force"), 2,
                             "--output-prefix {ws}/out (its file out.report.json) is the input {ws}/out.report.json: writing "
                             "it would destroy the input"), "input_named_like_output"),
    "inside_tokenizer": (Case(TOOL, "the prefix inside the tokenizer directory", ("--input", "{ws}/data.jsonl", "--output-prefix",
                                                                                  "{ws}/tok/data", "--tokenizer", "{ws}/tok",
                                                                                  "--no-progress"), 2,
                              "--output-prefix {ws}/tok/data (its file data_tokens.bin) lies inside the input {ws}/tok: write "
                              "it elsewhere"), "tokenizer_copy"),
}
CASES = {name: case for name, (case, _) in TABLE.items()}


def copy_tokenizer(source: Path, destination: Path) -> Path:
    """The tokenizer's files (of a directory that may hold a model too)."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(path, destination)
    return destination


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A dataset this tool wrote, to stand at the output prefix."""
    directory = tmp_path_factory.mktemp("dataset")
    (directory / "data.jsonl").write_text(json.dumps(GOOD) + "\n")
    run(PreprocessConfig([str(directory / "data.jsonl")], str(directory / "out"), str(smollm2.tokenizer_dir()), progress=False),
        tokenizer=smollm2.load_tokenizer())
    return directory


@pytest.mark.parametrize("name", list(TABLE))
def test_refused_with_a_message_and_nothing_changed(tmp_path, dataset, name):
    case, holds = TABLE[name]
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    if holds == "empty":
        (tmp_path / "empty.jsonl").write_text("\n\n")
    elif holds == "blank_responses":
        (tmp_path / "blank_responses.jsonl").write_text(json.dumps(EMPTY_RESPONSE) + "\n" + json.dumps(EMPTY_RESPONSE) + "\n")
    elif holds == "dataset":
        for path in dataset.glob("out*"):
            shutil.copy(path, tmp_path)
    elif holds == "foreign":
        (tmp_path / "out_tokens.bin").write_text("a user's file")
    elif holds == "input_named_like_output":
        (tmp_path / "out.report.json").write_text(json.dumps([GOOD]))
    elif holds == "tokenizer_copy":
        copy_tokenizer(smollm2.tokenizer_dir(), tmp_path / "tok")
    check(case, {"ws": tmp_path, "tok": smollm2.tokenizer_dir()}, tmp_path, main)


def test_force_replaces_a_dataset_this_tool_wrote(tmp_path, dataset, capsys):
    """The counterpart of the refusals: --force over this tool's dataset replaces it whole."""
    for path in dataset.glob("out*"):
        shutil.copy(path, tmp_path)
    old_uuid = json.loads((tmp_path / "out.meta.json").read_text())["dataset_uuid"]
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    argv = ["--input", str(tmp_path / "data.jsonl"), "--output-prefix", str(tmp_path / "out"), *COMMON[:1],
            str(smollm2.tokenizer_dir()), "--no-progress", "--force"]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["records"] == 2 and meta["dataset_uuid"] != old_uuid
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data.jsonl", *(p.name for p in dataset.glob("out*"))])
