"""WITDataset through megatron-core's BlendedMegatronDatasetBuilder on real preprocessed data
(HumanEval, SmolLM2 tokenizer): λ at load time, packing, truncation, determinism, blends.
Every expected sample is rebuilt here from the authors' formula (test_data_preprocess.authors_reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_data_preprocess import authors_reference, humaneval, reference_truncation, write_jsonl
from wit_megatron.data.dataset import WITDataset, WITDatasetConfig, build_datasets
from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.roles import RoleWeights
from wit_megatron.testing import llama3, mistral, smollm2

KEYS = ("tokens", "labels", "loss_mask", "loss_weights", "response_mask", "position_ids")


@pytest.fixture(scope="module")
def humaneval_prefix(tmp_path_factory) -> tuple[str, list[tuple[list[int], int]]]:
    """The preprocessed HumanEval prefix and, per record, the reference (ids, boundary)."""
    tmp = tmp_path_factory.mktemp("he")
    records = humaneval()
    prefix = str(tmp / "he")
    run(PreprocessConfig([write_jsonl(tmp / "he.jsonl", records)], prefix, str(smollm2.tokenizer_dir()), progress=False))
    tokenizer = smollm2.load_tokenizer()
    return prefix, [authors_reference(tokenizer, r) for r in records]


def config(prefix, cache, seq_length=1024, weights=(0.2, 1.0), **kw) -> WITDatasetConfig:
    kw.setdefault("split", "100,0,0")
    blend = kw.pop("blend", ([prefix] if isinstance(prefix, str) else prefix, None))
    return WITDatasetConfig(random_seed=kw.pop("seed", 1234), sequence_length=seq_length, blend=blend,
                            role_weights=RoleWeights(*weights), path_to_cache=str(cache), **kw)


def reference_sample(ids: list[int], boundary: int, weights, seq_length: int) -> dict[str, list]:
    """One record alone, padded: targets shifted by one, target t weighted by its token's role."""
    n = len(ids) - 1
    pad = seq_length - n
    w = [weights[0] if t < boundary else weights[1] for t in range(1, len(ids))]
    return {
        "tokens": ids[:-1] + [0] * pad,
        "labels": ids[1:] + [0] * pad,
        "loss_mask": [1.0] * n + [0.0] * pad,
        "loss_weights": [float(np.float32(x)) for x in w] + [0.0] * pad,
        "response_mask": [t >= boundary for t in range(1, len(ids))] + [False] * pad,
        "position_ids": list(range(n)) + [0] * pad,
    }


def as_lists(sample: dict) -> dict[str, list]:
    return {k: sample[k].tolist() for k in KEYS}


def test_unpacked_samples_apply_lambda_at_load_time(humaneval_prefix, tmp_path):
    prefix, reference = humaneval_prefix
    by_first_ids = {tuple(ids[:-1]): (ids, b) for ids, b in reference}
    for weights in [(0.2, 1.0), (0.0, 1.0), (1.0, 0.6)]:
        (train, _, _) = build_datasets(config(prefix, tmp_path, weights=weights, packing=False), [None, None, None])
        assert len(train) == len(reference)
        seen = set()
        for i in range(len(train)):
            sample = train[i]
            n = int(sample["loss_mask"].sum())
            ids, b = by_first_ids[tuple(sample["tokens"][:n].tolist())]
            assert as_lists(sample) == reference_sample(ids, b, weights, 1024), i
            assert "document_ids" not in sample
            seen.add(tuple(ids))
        assert len(seen) == len(reference)  # one epoch: every record exactly once
    # λ is not in the cache key: three λ, one cached index.
    assert len(list(tmp_path.glob("*-sample_records.npy"))) == 1


def test_per_role_weights_beyond_prompt_and_response(tmp_path):
    """A chat dataset: λ_system, λ_user, λ_tool apply to exactly the tokens stored with those roles."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tests.test_data_chat import SYSTEM_TWO_TURNS, WITH_TOOL

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (SYSTEM_TWO_TURNS, WITH_TOOL)))
    prefix = str(tmp_path / "chat")
    run(PreprocessConfig([str(data)], prefix, str(smollm2.tokenizer_dir()), progress=False))
    lam = {0: 0.1, 1: 1.0, 2: 0.3, 3: 0.5, 4: 0.7}  # prompt, response, system, user, tool
    (train, _, _) = build_datasets(config(prefix, tmp_path, seq_length=256, weights=(0.1, 1.0, 0.3, 0.5, 0.7)), [None, None, None])
    tokens, roles = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_roles")
    expected = {tuple(tokens[i].tolist()[:-1]): [float(np.float32(lam[r])) for r in roles[i].tolist()[1:]] for i in range(len(tokens))}
    (sample,) = [train[i] for i in range(len(train))]  # both conversations fit in one packed sequence
    for d in range(2):
        seg = sample["document_ids"] == d
        got = sample["loss_weights"][seg].tolist()
        assert got == expected[tuple(sample["tokens"][seg].tolist())]
        assert set(got) >= {float(np.float32(x)) for x in (0.1, 1.0, 0.5, 0.3 if d == 0 else 0.7)}


def test_packing_isolates_records_and_reports_padding(humaneval_prefix, tmp_path):
    prefix, reference = humaneval_prefix
    seq_length = 1024
    (packed, _, _) = build_datasets(config(prefix, tmp_path, seq_length=seq_length), [None, None, None])
    by_first_ids = {tuple(ids[:-1]): (ids, b) for ids, b in reference}
    seen, filled = [], 0
    for i in range(len(packed)):
        sample = packed[i]
        doc = sample["document_ids"]
        n_docs = int(doc.max()) + 1
        assert torch.equal(doc[doc >= 0], torch.repeat_interleave(torch.arange(n_docs), torch.bincount(doc[doc >= 0])))
        assert bool((doc[int((doc >= 0).sum()):] == -1).all())  # padding only at the end
        for d in range(n_docs):
            seg = doc == d
            piece = {k: sample[k][seg].tolist() for k in KEYS}
            ids, b = by_first_ids[tuple(piece["tokens"])]
            expected = reference_sample(ids, b, (0.2, 1.0), len(ids) - 1)  # no padding
            assert piece == expected
            seen.append(tuple(ids))
        filled += int(sample["loss_mask"].sum())
        assert float(sample["loss_weights"][doc == -1].abs().sum()) == 0.0
    assert sorted(seen) == sorted(tuple(ids) for ids, _ in reference)  # every record exactly once
    padding = 1 - filled / (len(packed) * seq_length)
    assert packed.stats["padding_fraction"] == pytest.approx(padding, abs=1e-6)
    padding_sample = packed[None]  # Megatron's batch padding: nothing to learn, attention to nothing
    assert float(padding_sample["loss_mask"].sum()) == float(padding_sample["loss_weights"].sum()) == 0.0
    assert bool((padding_sample["document_ids"] == -1).all()) and not bool(padding_sample["response_mask"].any())
    total = sum(len(ids) - 1 for ids, _ in reference)
    assert len(packed) <= -(-total // seq_length) + 1  # within one bin of the lower bound ceil(total / s)


@pytest.mark.parametrize("name", ["smollm2", "mistral", "llama3"])
def test_load_time_truncation(humaneval_prefix, tmp_path, name):
    """Records longer than seq_length + 1 are cut like preprocessing cuts them (tests.test_data_preprocess.
    reference_truncation: a BOS the tokenizer added, Mistral's or Llama-3's, stays in front of a left cut;
    SmolLM2 adds none, so its cut is plain); under `right`, records left without a response target are
    dropped and counted, as preprocessing skips them. Llama-3's 128,256 ids are stored as int32, the
    others' as uint16."""
    keeps_bos = name in ("mistral", "llama3")
    if keeps_bos:
        family = {"mistral": mistral, "llama3": llama3}[name]
        records, tokenizer = humaneval(), family.load_tokenizer()
        prefix = str(tmp_path / "he")
        run(PreprocessConfig([write_jsonl(tmp_path / "he.jsonl", records)], prefix, str(family.tokenizer_dir()), progress=False))
        reference = [authors_reference(tokenizer, r) for r in records]
    else:
        prefix, reference = humaneval_prefix
    token_dtype = json.loads(Path(prefix + ".meta.json").read_text())["token_dtype"]
    assert token_dtype == ("int32" if name == "llama3" else "uint16")
    seq_length = 127
    for policy in ("keep_response", "right"):
        (train, _, _) = build_datasets(config(prefix, tmp_path / policy, seq_length=seq_length, packing=False, truncation=policy),
                                       [None, None, None])
        expected, dropped = [], 0
        for ids, b in reference:
            ids, roles = reference_truncation(ids, [0] * b + [1] * (len(ids) - b), seq_length + 1, policy, keeps_bos)
            if 1 not in roles[1:]:
                dropped += 1
                continue
            expected.append((ids[:-1], ids[1:], roles[1:]))
        got = []
        for i in range(len(train)):
            s = train[i]
            n = int(s["loss_mask"].sum())
            got.append((s["tokens"][:n].tolist(), s["labels"][:n].tolist(), s["response_mask"][:n].long().tolist()))
        assert sorted(got) == sorted(expected), policy
        assert train.stats["records_truncated"] == sum(len(ids) > seq_length + 1 for ids, _ in reference) > 100
        assert train.stats["records_dropped_no_response"] == dropped
        assert (dropped > 10) == (policy == "right"), dropped


def test_deterministic_order_and_resumption(humaneval_prefix, tmp_path):
    prefix, _ = humaneval_prefix
    n = 500  # several epochs
    a = build_datasets(config(prefix, tmp_path / "a", seq_length=512), [n, None, None])[0]
    b = build_datasets(config(prefix, tmp_path / "b", seq_length=512), [n, None, None])[0]  # fresh cache, same seed
    c = build_datasets(config(prefix, tmp_path / "a", seq_length=512), [n, None, None])[0]  # cache hit
    other = build_datasets(config(prefix, tmp_path / "c", seq_length=512, seed=7), [n, None, None])[0]
    assert len(a) >= n and len(a) == len(b) == len(c)
    samples = [a[i] for i in range(len(a))]
    for ds in (b, c):
        # resuming at any iteration k reads the samples an uninterrupted run would have read
        for k in (0, 1, 137, len(a) - 1):
            assert all(torch.equal(samples[k][key], ds[k][key]) for key in samples[k])
    assert any(not torch.equal(samples[k]["tokens"], other[k]["tokens"]) for k in range(10))
    epochs = [np.concatenate([a.sample_records[a.sample_offsets[i]:a.sample_offsets[i + 1]] for i in range(lo, hi)])
              for lo, hi in [(0, 10), (len(a) - 10, len(a))]]
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch is shuffled afresh


def test_blend_with_weights_and_splits(tmp_path):
    """Two different datasets (HumanEval's first and second halves, preprocessed apart) blended 0.3 / 0.7
    with a 90/10 split, as Megatron users set it up: every record of every train and valid sample is a
    record of the dataset its `dataset_id` names, with its reference tokens, labels and weights. (A blend
    of two copies of one prefix, as this test had, passes even when a sub-dataset reads the wrong prefix:
    checked by giving both sub-datasets the first prefix, which this test refuses.)"""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    records, tokenizer = humaneval(), smollm2.load_tokenizer()
    halves = [records[:82], records[82:]]
    prefixes, sources = [], []
    for i, half in enumerate(halves):
        prefix = str(tmp_path / f"half{i}")
        run(PreprocessConfig([write_jsonl(tmp_path / f"half{i}.jsonl", half)], prefix, str(smollm2.tokenizer_dir()), progress=False),
            tokenizer=tokenizer)
        prefixes.append(prefix)
        sources.append({tuple(ids[:-1]): (ids, b) for ids, b in (authors_reference(tokenizer, r) for r in half)})
    assert not set(sources[0]) & set(sources[1])
    seq_length = 1024  # no HumanEval record is cut at this length
    cfg = config(prefixes, tmp_path, seq_length=seq_length, blend=(prefixes, [0.3, 0.7]), split="90,10,0")
    train, valid, test = build_datasets(cfg, [200, 20, 0])
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 20 and test is None  # split 0 -> None
    assert all(isinstance(d, WITDataset) for d in train.datasets)
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert abs((ids == 0).mean() - 0.3) < 0.02
    expected = {}  # tokens -> the record's reference sample, built once
    records_seen = [set(), set()]
    for blend in (train, valid):
        for i in range(len(blend)):
            sample = blend[i]
            source = int(sample["dataset_id"])
            lists = {k: sample[k].tolist() for k in KEYS}
            ends = np.cumsum(np.bincount(sample["document_ids"][sample["document_ids"] >= 0].numpy()))  # records are contiguous
            for start, end in zip([0, *ends[:-1]], ends):
                piece = {k: v[start:end] for k, v in lists.items()}
                tokens = tuple(piece["tokens"])
                assert tokens in sources[source], f"sample {i} of dataset {source} holds a record of the other dataset"
                if tokens not in expected:
                    record_ids, boundary = sources[source][tokens]
                    expected[tokens] = reference_sample(record_ids, boundary, (0.2, 1.0), len(record_ids) - 1)
                assert piece == expected[tokens]
                records_seen[source].add((blend is valid, tokens))
    # both datasets are read, and train and valid records are disjoint (split by record)
    for seen in records_seen:
        train_records, valid_records = {t for v, t in seen if not v}, {t for v, t in seen if v}
        assert train_records and valid_records and not train_records & valid_records


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def test_mmap_bin_files_off_reads_the_data_into_memory(humaneval_prefix, tmp_path):
    """Megatron's `mmap_bin_files=False`: no .bin is mapped, and every sample is the mapped one."""
    prefix, _ = humaneval_prefix
    copy = str(tmp_path / "copy")  # a prefix no earlier test has mapped
    for suffix in ("_tokens.bin", "_tokens.idx", "_roles.bin", "_roles.idx", ".meta.json"):
        Path(copy + suffix).write_bytes(Path(prefix + suffix).read_bytes())
    bins = {str(Path(copy + suffix).resolve()) for suffix in ("_tokens.bin", "_roles.bin")}
    (in_memory, _, _) = build_datasets(config(copy, tmp_path, mmap_bin_files=False), [None, None, None])
    assert not bins & _mapped_files()
    (mapped, _, _) = build_datasets(config(copy, tmp_path), [None, None, None])
    assert bins <= _mapped_files()
    assert len(in_memory) == len(mapped) > 20
    for i in range(len(mapped)):
        assert all(torch.equal(in_memory[i][k], mapped[i][k]) for k in mapped[i]), i


@pytest.mark.parametrize("meta", ["with_uuid", "without_uuid"])
def test_preprocessing_again_into_the_prefix_gets_a_new_index(tmp_path, meta):
    """The cached index holds flat offsets into the .bin: a prefix preprocessed again with other records
    (the same config, the same path) must get its own index, not the old one's offsets. A meta.json from
    before `dataset_uuid` is told apart by the digest of the .idx files."""
    records = humaneval()
    prefix = str(tmp_path / "data")

    def preprocess(chosen: list[dict]):
        report = run(PreprocessConfig([write_jsonl(tmp_path / "in.jsonl", chosen)], prefix, str(smollm2.tokenizer_dir()), progress=False,
                                      force=True))
        if meta == "without_uuid":
            path = Path(prefix + ".meta.json")
            path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "dataset_uuid"}))
        return report

    preprocess(records[:50])
    (old, _, _) = build_datasets(config(prefix, tmp_path / "cache", seq_length=512), [None, None, None])
    report = preprocess(records[50:80])
    (new, _, _) = build_datasets(config(prefix, tmp_path / "cache", seq_length=512), [None, None, None])
    (fresh, _, _) = build_datasets(config(prefix, tmp_path / "fresh", seq_length=512), [None, None, None])
    assert len(new) == len(fresh) > 3
    for i in range(len(fresh)):
        assert all(torch.equal(new[i][k], fresh[i][k]) for k in fresh[i]), i
    assert new.unique_description_hash != old.unique_description_hash
    assert len(list((tmp_path / "cache").glob("*-description.txt"))) == 2  # the old index stays, unused
    identity = new.unique_identifiers["data"]
    assert set(identity) == {"records", "tokens", "dataset_uuid" if meta == "with_uuid" else "index_md5"}
    assert (identity["records"], identity["tokens"]) == (30, report.tokens) and old.unique_identifiers["data"]["records"] == 50
    preprocess(records[50:80])  # the same records once more
    (again, _, _) = build_datasets(config(prefix, tmp_path / "cache", seq_length=512), [None, None, None])
    # Every run writes a new uuid (a new index, however alike the data); an unchanged digest keeps the old one.
    assert (again.unique_description_hash != new.unique_description_hash) == (meta == "with_uuid")


def test_corrupt_sample_index_is_refused_not_written_past(humaneval_prefix, tmp_path):
    """assemble_sample writes without bounds checks, trusting the index: a record size that would
    overflow the sequence (an index that does not belong to the data) raises instead."""
    prefix, _ = humaneval_prefix
    (train, _, _) = build_datasets(config(prefix, tmp_path, seq_length=256), [None, None, None])
    train[0]
    train.record_size = np.full_like(train.record_size, 257)
    with pytest.raises(ValueError, match="sample index corrupt"):
        train[0]


def test_the_index_cache_is_never_seen_half_written_by_the_pickle_check(humaneval_prefix, tmp_path, monkeypatch):
    """Rank 0 writes the cached sample indices while other ranks run check_cached_indices over the same
    directory (it once refused, or failed to open, a temp file renamed under it): the temp files are not
    *.npy, and the check passes over a file that is gone or still empty (a writer has just opened it),
    while it still refuses one that is not an array."""
    from wit_megatron.data import dataset

    prefix, _ = humaneval_prefix
    replaced, replace = [], dataset.os.replace

    def checked_replace(src, dst):
        replaced.append((src, dst))
        dataset.check_cached_indices(str(tmp_path))  # the check as another rank runs it, mid-write
        replace(src, dst)

    monkeypatch.setattr(dataset.os, "replace", checked_replace)
    build_datasets(config(prefix, tmp_path), [None, None, None])
    assert len(replaced) == 5 and not [src for src, _ in replaced if src.endswith(".npy")], replaced
    (tmp_path / "opened-by-a-writer.npy").write_bytes(b"")
    dataset.check_cached_indices(str(tmp_path))
    monkeypatch.setattr(dataset.Path, "glob", lambda self, pattern: [tmp_path / "renamed-meanwhile.npy"])
    dataset.check_cached_indices(str(tmp_path))
    monkeypatch.undo()
    (tmp_path / "planted.npy").write_bytes(b"\x80\x04not an array")
    with pytest.raises(ValueError, match="planted.npy: not a plain NumPy array"):
        dataset.check_cached_indices(str(tmp_path))
