"""`wit-inspect` on real data: HumanEval and a real chat set (Chit Chat Challenge conversations through
SmolLM2's own chat template), both tokenized with SmolLM2's tokenizer.

Proven here:
- the roles and weights it prints are those of the sample the training's dataset yields: its TSV,
  parsed back, equals `dataset[i]` tensor by tensor (built as examples/pretrain_wit.py builds it, from
  the same options), for packed samples past the first epoch, and for a record alone (--index);
  the plain and ANSI renderings mark the same (role, weight) runs;
- the per-dataset summary counts what preprocessing reported and names the records without a
  response or of one role throughout (HumanEval's empty-prompt record; hand-made bad records);
- the HTML page, rendered by a real headless Chromium (Debian's package), holds one token element per
  target with the dataset's weights, and its own script counts the expected tokens per role.
"""

from __future__ import annotations

import html.parser
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_data_preprocess import humaneval, write_jsonl
from wit_megatron.preview import cli
from wit_megatron.roles import Role, RoleWeights

# Distinct λ per role, so that a weight also names its role.
LAMBDAS = {"prompt": 0.2, "response": 0.8, "user": 0.5, "system": 0.3, "tool": 0.4}
LAMBDA_ARGS = [a for role, w in LAMBDAS.items() for a in (f"--lambda-{role}", str(w))]


def chat_records(count: int) -> list[dict]:
    """The first `count` conversations of the Chit Chat Challenge (two people taking turns) with at least
    two turns, as user/assistant messages."""
    import chitchat_dataset

    records = []
    for conversation in chitchat_dataset.Dataset().values():
        turns = [" ".join(u["text"] for u in turn) for turn in conversation["messages"]]
        if len(turns) >= 2:
            records.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]})
        if len(records) == count:
            return records
    raise AssertionError("the chat set has too few conversations")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from wit_megatron.data.preprocess import PreprocessConfig, run
    from wit_megatron.testing import smollm2

    tmp = tmp_path_factory.mktemp("inspect")
    tokenizer = smollm2.load_tokenizer()
    prefixes = {"he": str(tmp / "he" / "he"), "chat": str(tmp / "chat" / "chat")}
    inputs = {"he": write_jsonl(tmp / "he.jsonl", humaneval()), "chat": write_jsonl(tmp / "chat.jsonl", chat_records(24))}
    reports = {name: run(PreprocessConfig([inputs[name]], prefix, str(smollm2.tokenizer_dir()), progress=False),
                         tokenizer=tokenizer) for name, prefix in prefixes.items()}
    return {"tmp": tmp, **prefixes, "reports": reports, "tokenizer": tokenizer}


def run_inspect(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def parse_tsv(text: str) -> list[dict[str, torch.Tensor]]:
    """wit-inspect --format tsv, back to one dict of tensors per sample."""
    samples = []
    for block in re.split(r"^# .*\n", text, flags=re.M)[1:]:
        lines = block.strip("\n").split("\n")
        assert lines[0].startswith("position\t")
        rows = [line.split("\t") for line in lines[1:]]
        col = {name: [r[i] for r in rows] for i, name in enumerate(lines[0].split("\t"))}
        assert [int(p) for p in col["position"]] == list(range(len(rows)))
        samples.append({
            "tokens": torch.tensor([int(x) for x in col["input_id"]]),
            "labels": torch.tensor([int(x) for x in col["target_id"]]),
            "loss_weights": torch.tensor([float(x) for x in col["weight"]], dtype=torch.float32),
            "position_ids": torch.tensor([int(x) for x in col["position_id"]]),
            "document_ids": torch.tensor([int(x) for x in col["document"]]),
            "role": col["role"],
            "record": [int(x) for x in col["record"]],
        })
    return samples


def training_datasets(argv: list[str]):
    """The (train, valid) datasets examples/pretrain_wit.py builds from `argv` (its parser and defaults, its
    DataConfig, its sample count), without the model --load it would also need."""
    from types import SimpleNamespace

    from wit_megatron.data.loader import build_datasets, parse_blend
    from wit_megatron.training import loop
    from wit_megatron.training.arguments import build_parser

    args = build_parser().parse_args(argv)
    args.blend, args.blend_per_split, args.arch = parse_blend(args.data_path), None, SimpleNamespace(tokenizer_vocab_size=None)
    args.role_weights = RoleWeights(args.lambda_prompt, args.lambda_response, args.lambda_system, args.lambda_user, args.lambda_tool)
    if args.train_iters is None:
        args.train_epochs = args.train_epochs or 1
    return build_datasets(loop._data_config(args), args.train_iters * args.global_batch_size if args.train_iters else None,
                          None, True)


def assert_same_sample(printed: dict, sample: dict, packed: bool) -> None:
    mask = sample["loss_mask"] != 0
    for key in ("tokens", "labels", "loss_weights", "position_ids") + (("document_ids",) if packed else ()):
        assert torch.equal(printed[key], sample[key]), key
    roles = printed["role"]
    assert torch.equal(torch.tensor([r != "pad" for r in roles]), mask)
    assert torch.equal(torch.tensor([r == "response" for r in roles]), sample["response_mask"])
    # The printed role is the one the weight belongs to (λ distinct per role).
    table = RoleWeights(**LAMBDAS).table()
    expected = torch.tensor([float(table[Role[r.upper()]]) if r != "pad" else 0.0 for r in roles], dtype=torch.float32)
    assert torch.equal(expected, sample["loss_weights"])


def test_printed_roles_and_weights_are_the_datasets_tensor_by_tensor(data, capsys):
    """Packed HumanEval at s=256 over more than one epoch (--train-iters x --global-batch-size, as training counts them),
    packed chat at s=512 (long conversations cut by the default truncation), and single chat records."""
    he = ["--data-path", data["he"], "--seq-length", "256"]
    chat_run = ["--data-path", data["chat"], "--seq-length", "512"]
    he_epoch, _ = training_datasets(he + LAMBDA_ARGS)
    for run in (he + ["--train-iters", "30", "--global-batch-size", "8"], chat_run):
        train, _ = training_datasets(run + LAMBDA_ARGS)
        samples = [0, 1, len(train) // 2, len(train) - 1]
        printed = parse_tsv(run_inspect(run + LAMBDA_ARGS + ["--format", "tsv", "--sample", *map(str, samples)],
                                        capsys))
        assert len(printed) == len(samples)
        for idx, p in zip(samples, printed):
            assert_same_sample(p, train[idx], packed=True)
        if run[1] == data["he"]:  # packed, and the last sample is from the second epoch
            assert len(train) >= 240 > len(he_epoch) and any(len(set(p["record"]) - {-1}) > 1 for p in printed)

    # --index: a record alone is the unpacked dataset's sample of that record.
    train, _ = training_datasets(chat_run + LAMBDA_ARGS + ["--no-packing"])
    picks = [0, 3, len(train) - 1]
    records = [int(train.records_of(i)[0]) for i in picks]
    printed = parse_tsv(run_inspect(chat_run + LAMBDA_ARGS + ["--format", "tsv", "--index", *map(str, records)], capsys))
    for idx, record, p in zip(picks, records, printed):
        assert set(p["record"]) - {-1} == {record}
        assert_same_sample(p, train[idx], packed=False)

    # Plain (not a TTY here) and ANSI: the same text, markers at the same (role, weight) runs as the TSV.
    tsv = parse_tsv(run_inspect(chat_run + LAMBDA_ARGS + ["--format", "tsv", "--sample", "2"], capsys))[0]
    plain = run_inspect(chat_run + LAMBDA_ARGS + ["--sample", "2"], capsys)
    ansi = run_inspect(chat_run + LAMBDA_ARGS + ["--sample", "2", "--format", "ansi"], capsys)
    assert "\033[" not in plain and "\033[" in ansi
    runs = []
    for rec in sorted(set(tsv["record"]) - {-1}, key=tsv["record"].index):
        at = [i for i, r in enumerate(tsv["record"]) if r == rec]
        keys = [(tsv["role"][i], float(tsv["loss_weights"][i])) for i in at]
        runs += [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    marks = [(m.group(1), float(m.group(2))) for m in re.finditer(r"«(\w+) ([\d.e-]+)»", plain)]
    assert marks == [(role, float(f"{w:g}")) for role, w in runs]
    assert re.sub(r"\033\[[\d;]*m", "", ansi).replace("«context» ", "") == plain.replace("«context» ", "")
    assert "[<|im_start|>]" in plain and "[<|im_end|>]" in plain  # template tokens shown by name


def test_summary_counts_roles_and_names_the_records_a_template_bug_shows_in(data, capsys, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from wit_megatron.data.indexed import WITIndexedWriter, meta_path

    out = run_inspect(["--data-path", data["he"], data["chat"], *LAMBDA_ARGS], capsys)
    for name in ("he", "chat"):
        report = data["reports"][name]
        roles = IndexedDataset(data[name] + "_roles")
        per_record = [np.asarray(roles[i]) for i in range(len(roles))]
        targets = np.concatenate([r[1:] for r in per_record])
        weights = RoleWeights(**LAMBDAS).table().numpy()[targets]
        by_role = {k: v for k, v in report.tokens_by_role.items() if v}
        head = (f"=== {data[name]}: {report.records_written} records, {report.tokens} tokens: "
                + ", ".join(f"{role} {n} (targets {int((targets == Role[role.upper()]).sum())}, λ {LAMBDAS[role]:g})"
                            for role, n in by_role.items()))
        assert head in out
        assert f"targets with non-zero weight: {int((weights != 0).sum())} of {len(targets)} " in out
    # HumanEval's last record has an empty prompt: the whole record is response (named, by record).
    one_role = [i for i, r in enumerate(IndexedDataset(data["he"] + "_roles")) if len(set(np.asarray(r).tolist())) == 1]
    assert one_role == [166] and humaneval()[166]["prompt"] == ""
    assert "records of one role throughout: 1: 166 (response)" in out

    # Bad records a broken template makes: none of the response, all of it.
    prefix = str(tmp_path / "bad")
    writer = WITIndexedWriter(prefix, 49152)
    tokens = np.arange(10, 20)
    for roles in ([0] * 5 + [1] * 5, [3] * 10, [1] * 10, [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]):
        writer.add(tokens, np.asarray(roles, dtype=np.uint8))
    meta = json.loads(Path(meta_path(data["he"])).read_text())
    writer.finalize({k: meta[k] for k in ("tokenizer", "bos_token_id", "added_bos_token_id", "eos_token_id", "pad_token_id",
                                          "append_eos", "max_length", "truncation")} | {"records": 4})
    out = run_inspect(["--data-path", prefix, "--lambda-prompt", "0", "--lambda-response", "1"], capsys)
    assert "records without a response token: 1: 1\n" in out
    assert "records of one role throughout: 2: 1 (user), 2 (response)\n" in out
    assert "targets with non-zero weight: 17 of 36 (47.22%)" in out  # 5 + 0 + 9 + 3 response targets, 9 per record


class _Tokens(html.parser.HTMLParser):
    """Token spans (class, data-w) and the counts tables' cells of a DOM dump."""

    def __init__(self):
        super().__init__()
        self.spans, self.cells, self._cell = [], {}, None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "span" and "tok" in cls and "data-w" in a:
            self.spans.append((next(c[2:] for c in cls if c.startswith("r-")), float(a["data-w"])))
        if tag == "tr" and "data-role" in a:
            self._row = a["data-role"]
        if tag == "td" and self._row:
            self._cell = (self._row, cls[0])

    def handle_data(self, text):
        if self._cell:
            self.cells.setdefault(self._cell, []).append(text)
            self._cell = None


def test_the_html_page_renders_in_headless_chromium_with_the_datasets_tokens(data, capsys, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is needed (.ci/run installs it)"
    run = ["--data-path", data["chat"], "--seq-length", "512"]
    train, _ = training_datasets(run + LAMBDA_ARGS)
    picks = [0, len(train) - 1]
    page = tmp_path / "inspect.html"
    run_inspect(run + LAMBDA_ARGS + ["--sample", *map(str, picks), "--html", str(page)], capsys)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Tokens()
    parsed.feed(dom.stdout)
    samples = [train[i] for i in picks]
    weights = torch.cat([s["loss_weights"][s["loss_mask"] != 0] for s in samples])
    assert torch.equal(torch.tensor([w for _, w in parsed.spans], dtype=torch.float32), weights)  # one span per target
    for (role, w) in parsed.spans:
        assert w == pytest.approx(LAMBDAS[role])
    # Counts per role, filled in by the page's script in the browser: the dataset's, sample by sample.
    counted = {key: [int(v) if key[1] != "mass" else float(v) for v in values] for key, values in parsed.cells.items()}
    for role in ("prompt", "response", "user"):
        expected = [int((s["loss_weights"][s["loss_mask"] != 0] == np.float32(LAMBDAS[role])).sum()) for s in samples]
        assert all(expected) and counted[(role, "n")] == expected and counted[(role, "nw")] == expected, role
