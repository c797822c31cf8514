"""Checkpoints written by megatron-core 0.16.1 and by 0.19.2 (fixtures from tests/scenarios/convert_fixtures.py)
both load in the running version at tp2pp2 with no missing or unexpected keys, give the HF model's
logits, and export back to the exact HF tensors. Run under both venvs, this covers both directions."""

from __future__ import annotations

import torch

from tests.convert_models import safetensors_of
from tests.scenarios.convert_fixtures import FIXTURES
from wit_megatron.convert.verify import hf_logits
from wit_megatron.runtime.launch import run_distributed

WRITTEN_BY = ["0.16.1", "0.19.2"]


def test_checkpoints_of_every_supported_version_load_and_export(tmp_path):
    hf = FIXTURES / "tiny-llama-hf"
    checkpoints = [FIXTURES / f"tiny-llama-mcore-{v}" for v in WRITTEN_BY]
    for checkpoint in checkpoints:
        assert (checkpoint / "release" / "common.pt").exists()  # 0.16 reads the common state only from there
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    per_rank = run_distributed("tests.scenarios.convert_cases:logits", 4,
                               jobs=[dict(checkpoint=str(c), layout=(2, 2, None), tokens=tokens) for c in checkpoints])
    reference = hf_logits(hf, tokens)
    for i, version in enumerate(WRITTEN_BY):
        assert all(not r[i]["missing"] and not r[i]["unexpected"] for r in per_rank), (version, per_rank[0][i])
        (logits,) = [r[i]["logits"] for r in per_rank if r[i]["logits"] is not None]
        assert (logits - reference).abs().max().item() <= 1e-4, version

    for version, checkpoint in zip(WRITTEN_BY, checkpoints):
        run_distributed("tests.scenarios.convert_cases:exports", 1, jobs=[(str(checkpoint), str(tmp_path / version))])
        original, exported = safetensors_of(hf), safetensors_of(tmp_path / version)
        assert sorted(original) == sorted(exported), version
        assert all(torch.equal(exported[k], v) and exported[k].dtype == v.dtype for k, v in original.items()), version
