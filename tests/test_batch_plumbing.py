"""get_batch: each stage gets exactly its tensors, bit-equal and in their dtypes; CP slicing of
loss_weights equals a hand-written load-balanced slicing of the same sequence."""

import pytest
import torch

from tests.scenarios.plumbing import source_batch
from wit_megatron.batch import FIRST_STAGE_KEYS, LAST_STAGE_KEYS, packed_attention_mask, packed_seq_params
from wit_megatron.runtime.launch import run_distributed


def expected_keys(first: bool, last: bool, packed: bool) -> set:
    keys = {"document_ids"} if packed else set()
    return keys | (set(FIRST_STAGE_KEYS) if first else set()) | (set(LAST_STAGE_KEYS) if last else set())


def cp_reference(t: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Split the sequence into 2*cp chunks; rank r keeps chunks r and 2*cp-1-r."""
    chunks = t.chunk(2 * cp_size, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=1)


@pytest.fixture(scope="module")
def results():
    return run_distributed(
        "tests.scenarios.plumbing:run", 4, layouts=[(2, 2), (1, 4), (1, 2, 2), (1, 1, None, 2), (2, 1, None, 2)], packed=True
    ) , run_distributed("tests.scenarios.plumbing:run", 2, layouts=[(1, 1, None, 2)], packed=False)


def test_stages_get_exactly_their_tensors(results):
    packed_runs, _ = results
    source = source_batch(packed=True)
    seen = set()
    for rank_results in packed_runs:
        for r in rank_results:
            if r["cp_size"] > 1:
                continue
            pp_size = {"tp2pp2": 2, "tp1pp4": 4, "tp1pp2vpp2": 2}[r["layout"]]
            vp = r["vp_stage"]
            first = r["pp"] == 0 and vp in (None, 0)
            last = r["pp"] == pp_size - 1 and vp in (None, 1)
            present = {k for k, v in r["batch"].items() if v is not None}
            assert present == expected_keys(first, last, packed=True), r["layout"]
            for key in present:
                got = r["batch"][key]
                assert got.dtype == source[key].dtype, key
                assert torch.equal(got, source[key]), f"{r['layout']} {key} changed in transit"
            seen.add((r["layout"], r["pp"], vp, r["tp"]))
    assert ("tp1pp4", 1, None, 0) in seen and ("tp2pp2", 1, None, 1) in seen  # a middle stage, a TP peer
    assert ("tp1pp2vpp2", 0, 1, 0) in seen  # a middle virtual stage on the first rank


def test_context_parallel_slices_weights_like_labels(results):
    packed_runs, plain_runs = results
    source = source_batch(packed=False)
    checked = 0
    for rank_results in plain_runs:
        for r in rank_results:
            assert r["cp_size"] == 2
            for key, value in r["batch"].items():
                if key == "document_ids":
                    assert value is None
                    continue
                expected = cp_reference(source[key], r["cp"], 2)
                assert value.dtype == source[key].dtype and torch.equal(value, expected), key
                checked += 1
    assert checked == 2 * 6
    # Packed records would need per-record (THD) slicing: refused rather than sliced wrongly, on all
    # 4 ranks of each of the two CP layouts.
    refusals = [r["error"] for rank in packed_runs for r in rank if r["cp_size"] > 1]
    assert len(refusals) == 8 and all("not supported" in e for e in refusals)


def test_packed_attention_mask_matches_hand_written_mask():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = packed_attention_mask(ids)
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    for i, j in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 5)]:
        allowed[i, j] = True
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], ~allowed)


def test_packed_seq_params_boundaries():
    params = packed_seq_params(torch.tensor([[0, 0, 0, 1, 1, -1, -1]]))
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 7] and params.max_seqlen_q == 3
    # A micro-batch of 2 is one flat sequence of 2*s tokens.
    params = packed_seq_params(torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1]]))
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10, 12] and params.max_seqlen_q == 4
    # A row starts a segment even when its first record id equals the previous row's last one.
    assert packed_seq_params(torch.zeros(2, 3, dtype=torch.long)).cu_seqlens_q.tolist() == [0, 3, 6]
