"""A checkpoint saved by training at tp2pp2 (Megatron-LM layout, iter_0000001) converts to HF and the HF
model reproduces the trained model's logits; training really changed the weights."""

from __future__ import annotations

import torch

from tests.convert_models import build, safetensors_of
from wit_megatron.convert.verify import hf_logits
from wit_megatron.runtime.launch import run_distributed


def test_training_checkpoint_at_tp2pp2_exports_to_hf(tmp_path):
    hf = build("llama_gqa_tied", tmp_path / "hf")
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    run_distributed("tests.scenarios.convert_cases:round_trips", 1,
                    cases=[dict(hf=str(hf), megatron=str(tmp_path / "converted"), back=str(tmp_path / "back"))])
    per_rank = run_distributed("tests.scenarios.convert_training:train_and_save", 4, checkpoint=str(tmp_path / "converted"),
                               out=str(tmp_path / "trained"), layout=(2, 2, None), tokens=tokens)
    assert all(not r["missing"] and not r["unexpected"] for r in per_rank)
    (trained_logits,) = [r["logits"] for r in per_rank if r["logits"] is not None]
    assert (tmp_path / "trained" / "latest_checkpointed_iteration.txt").read_text() == "1"
    # Megatron-LM's `args` hold the layout of the run that saved (a converted checkpoint's: one rank).
    for saved, layout in (("trained/iter_0000001", (2, 2, 4, 1)), ("converted/release", (1, 1, 1, 1))):
        args = torch.load(tmp_path / saved / "common.pt", weights_only=False)["args"]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size,
                args.data_parallel_size) == layout, saved
        assert args.virtual_pipeline_model_parallel_size is None and args.context_parallel_size == 1

    run_distributed("tests.scenarios.convert_cases:exports", 1, jobs=[(str(tmp_path / "trained"), str(tmp_path / "trained_hf"))])
    exported = hf_logits(tmp_path / "trained_hf", tokens)
    assert (exported - trained_logits).abs().max().item() <= 1e-4
    before, after = safetensors_of(hf), safetensors_of(tmp_path / "trained_hf")
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))  # every tensor trained
    assert (hf_logits(hf, tokens) - trained_logits).abs().max().item() > 1e-2
