"""A built WITDataset through the model: packed records have the per-token losses they have unpacked,
and tp2pp2 training gives the single-process reference's WIT loss (tests/scenarios/data_model.py)."""

from __future__ import annotations

import pytest
import torch

from tests.test_data_preprocess import humaneval, write_jsonl
from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.testing import smollm2
from wit_megatron.runtime.launch import run_distributed

SEQ_LENGTH = 256


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data_model")
    prefix = str(tmp / "he")
    run(PreprocessConfig([write_jsonl(tmp / "he.jsonl", humaneval())], prefix, str(smollm2.tokenizer_dir()),
                         max_length=SEQ_LENGTH + 1, progress=False), tokenizer=smollm2.load_tokenizer())
    return run_distributed("tests.scenarios.data_model:run", 4, prefix=prefix, cache=str(tmp / "cache"),
                           seq_length=SEQ_LENGTH, mbs=2, num_microbatches=2, compare_samples=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_packed_records_have_their_unpacked_losses(results, dtype):
    """Per-token NLL (log-softmax in float64 from the model's logits) of each packed record equals its
    NLL alone, to 1e-6. What remains (~6e-7 in float32, ~9e-8 in float64) is rounding: summation
    order, and RoPE angles computed in float32 at other absolute positions."""
    pieces = results[0]["packing"][dtype]
    assert len(pieces) >= 6 and len({p["packed"].numel() for p in pieces}) >= 5  # records of mixed length
    assert any(p["offset"] > 100 for p in pieces)  # records far from position 0 of their sequence
    for p in pieces:
        assert p["packed"].shape == p["unpacked"].shape
        assert torch.allclose(p["packed"], p["unpacked"], rtol=0, atol=1e-6), (p["packed"] - p["unpacked"]).abs().max()


def test_tp2pp2_on_a_built_dataset_equals_the_reference(results):
    ref = results[0]["reference"]
    reports = [r["report"] for r in results if r["report"]]
    assert len(reports) == 2  # the last pipeline stage: both tensor-parallel ranks
    assert ref["records"] >= 8  # packed: several records per sequence
    for report in reports:
        assert report["lm loss tokens"] == ref["n"]
        assert report["lm loss"] == pytest.approx(ref["loss"], rel=1e-6)

