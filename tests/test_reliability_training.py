"""The training entry point (examples/pretrain_wit.py) on bad input (docs/reliability.md): its checks run
before any process group or model exists (`parse_args` -> `check_args`), so each case runs here.

The data is checked against the checkpoint: datasets that cannot be read or hold no records are named;
token ids outside the model's vocabulary are refused naming dataset and record; data tokenized with
another tokenizer than the one the checkpoint carries (hf_assets/) is refused naming both, unless
--allow-tokenizer-mismatch. An untrusted --load or --data-cache-path runs no code.

The checkpoint is the tiny converted fixture (vocabulary 100) with SmolLM2's tokenizer in its hf_assets;
for the tokenizer cases its record says 49152 ids (SmolLM2's), which is all check_args reads of it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.reliability import AS_BEFORE, Case, check
from tests.test_reliability_convert import CHECKPOINT, PAYLOAD_RAN, RAN, Payload, plant_in_metadata
from tests.test_reliability_preprocess import GOOD, copy_tokenizer
from wit_megatron.data.indexed import WITIndexedData, WITIndexedWriter
from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.testing import mistral, smollm2

TOOL = "examples/pretrain_wit.py"


def case(what: str, argv: tuple, exit: int, says: str, after: str = AS_BEFORE) -> Case:
    return Case(TOOL, what, argv, exit, says, after)


TABLE = {
    "zero_records": case("a dataset of 0 records (failed later: 'cannot mmap an empty file', no path)",
                         ("--load", "{ckpt}", "--data-path", "{ws}/zero"), 2,
                         "--data-path: {ws}/zero: cannot be read: {ws}/zero: the dataset holds no records"),
    "truncated_bin": case("a dataset whose .bin file is cut short", ("--load", "{ckpt}", "--data-path", "{ws}/smol"), 2,
                          "--data-path: {ws}/smol: cannot be read: {ws}/smol_tokens.bin has {cut} bytes, its index describes {full}"),
    "ids_outside_vocab": case("token ids >= the model's vocabulary (was an IndexError in the embedding)",
                              ("--load", "{ckpt}", "--data-path", "{ws}/smol"), 2,
                              "--data-path {ws}/smol: record 0 (0-based) holds token id {bad_id}, outside the model's "
                              "vocabulary of 100 ids (--load {ckpt}): the data was tokenized for another model"),
    "tokenizer_mismatch": case("data tokenized with another tokenizer (Mistral's) than the checkpoint's (SmolLM2's)",
                               ("--load", "{ckpt49k}", "--data-path", "{ws}/mistral"), 2,
                               "--data-path {ws}/mistral was tokenized with '{mistral}', not with --load's tokenizer "
                               "({ckpt49k}/hf_assets): vocab_size 32000 vs 49152; pad_token_id None vs 2; tokenizer_fingerprint"),
    "tokenizer_mismatch_allowed": case("the same with --allow-tokenizer-mismatch", ("--load", "{ckpt49k}", "--data-path",
                                                                                  "{ws}/mistral", "--allow-tokenizer-mismatch"),
                                       0, "note: --allow-tokenizer-mismatch: --data-path {ws}/mistral was tokenized with "
                                       "'{mistral}', not with --load's tokenizer"),
    "payload": case("a payload planted in --load's .metadata", ("--load", "{ckpt}", "--data-path", "{ws}/smol"), 2,
                    "--load: {ckpt}/release/.metadata: not a valid checkpoint: it " + RAN, AS_BEFORE + "; the payload did not run"),
    "payload_cache": case("a pickle planted as a cached index in --data-cache-path (megatron-core 0.16 unpickles those)",
                          ("--load", "{ckpt49k}", "--data-path", "{ws}/smol", "--data-cache-path", "{ws}/cache"), 2,
                          "{ws}/cache/0123-BlendedDataset-train-dataset_index.npy: not a plain NumPy array, as megatron-core's "
                          "cached indices are; refused without loading it", AS_BEFORE + "; the payload did not run"),
    "staging_load": case("--load inside the staging directory of an interrupted save",
                         ("--load", "{ws}/run/.iter_0000002.saving", "--data-path", "{ws}/smol"), 2,
                         "--load: {ws}/run/.iter_0000002.saving: not a complete checkpoint: .iter_0000002.saving is the hidden "
                         "staging directory of a write that has not finished"),
    "missing_distcp": case("a .distcp file missing from --load", ("--load", "{ckpt}", "--data-path", "{ws}/smol"), 2,
                           "--load: {ckpt}/release/__0_2.distcp is missing: it holds object"),
    "batch_sizes": case("a global batch that is no multiple of micro-batch x data-parallel size (was found after set-up)",
                        ("--load", "{ckpt49k}", "--data-path", "{ws}/smol", "--global-batch-size", "6", "--micro-batch-size",
                         "4"), 2, "--global-batch-size 6 is not a multiple of --micro-batch-size 4 x data-parallel size 1 = 4"),
    "warmup_not_shorter": case("a warm-up no shorter than the training (was a bare AssertionError in megatron-core's scheduler)",
                               ("--load", "{ckpt49k}", "--data-path", "{ws}/smol", "--train-iters", "2", "--lr-warmup-iters",
                                "2"), 2, "--lr-warmup-iters 2 must be below the decay iterations (2: --lr-decay-iters, else "
                               "--train-iters)"),
}
CASES = TABLE


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Datasets of two records tokenized with SmolLM2's and with Mistral's tokenizer; the fixture
    checkpoint with SmolLM2's tokenizer in hf_assets (and its twin whose record has SmolLM2's vocabulary)."""
    directory = tmp_path_factory.mktemp("training-inputs")
    (directory / "data.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    for name, family in (("smol", smollm2), ("mistral", mistral)):
        run(PreprocessConfig([str(directory / "data.jsonl")], str(directory / name), str(family.tokenizer_dir()),
                             progress=False), tokenizer=family.load_tokenizer())
    writer = WITIndexedWriter(str(directory / "zero"), 49152)  # what preprocessing wrote for an empty input before
    writer.finalize({"records": 0})
    for name, vocab in (("ckpt", None), ("ckpt49k", 49152)):
        shutil.copytree(CHECKPOINT, directory / name)
        copy_tokenizer(smollm2.tokenizer_dir(), directory / name / "hf_assets")
        if vocab:
            record = json.loads((directory / name / "wit_megatron.json").read_text())
            record["arch"].update(vocab_size=vocab, unpadded_vocab_size=None)
            (directory / name / "wit_megatron.json").write_text(json.dumps(record))
    return directory


@pytest.mark.parametrize("name", list(TABLE))
def test_refused_before_any_process_group(tmp_path, base, name, monkeypatch):
    import torch

    from wit_megatron.training.arguments import parse_args

    monkeypatch.delenv("RANK", raising=False)
    for path in base.iterdir():
        (shutil.copytree if path.is_dir() else shutil.copy)(path, tmp_path / path.name)
    ids = np.array(WITIndexedData(str(tmp_path / "smol")).get(0)[0])  # a copy: the file may be cut below
    tokens = (tmp_path / "smol_tokens.bin").read_bytes()
    paths = {"ws": tmp_path, "ckpt": tmp_path / "ckpt", "ckpt49k": tmp_path / "ckpt49k", "mistral": mistral.tokenizer_dir(),
             "bad_id": int(ids[ids >= 100][0]), "cut": len(tokens) // 2, "full": len(tokens)}
    if name == "truncated_bin":
        (tmp_path / "smol_tokens.bin").write_bytes(tokens[: len(tokens) // 2])
    elif name == "payload":
        plant_in_metadata(tmp_path / "ckpt", tmp_path / PAYLOAD_RAN)
    elif name == "payload_cache":
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache/0123-BlendedDataset-train-dataset_index.npy").write_bytes(pickle.dumps(Payload(tmp_path / PAYLOAD_RAN)))
    elif name == "staging_load":
        shutil.copytree(CHECKPOINT / "release", tmp_path / "run/.iter_0000002.saving")
    elif name == "missing_distcp":
        (tmp_path / "ckpt/release/__0_2.distcp").unlink()
    check(TABLE[name], paths, tmp_path, lambda argv: parse_args(argv, world_size=1) and 0)
    assert not (tmp_path / PAYLOAD_RAN).exists()
    assert not torch.distributed.is_initialized()


def test_a_payload_in_the_cache_would_run_through_numpy(tmp_path):
    """Why cached indices are checked: numpy.load(allow_pickle=True), as megatron-core 0.16.1's BlendedDataset
    calls it, runs a pickle found at a cache path (with or without mmap_mode)."""
    path = tmp_path / "x-dataset_index.npy"
    path.write_bytes(pickle.dumps(Payload(tmp_path / PAYLOAD_RAN)))
    np.load(path, allow_pickle=True, mmap_mode="r")
    assert (tmp_path / PAYLOAD_RAN).exists()
