"""Rank-side code of the batch plumbing tests: what get_batch hands each rank and stage."""

from __future__ import annotations

import torch

from wit_megatron.batch import get_batch
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.synthetic import synthetic_batch

SEQ_LEN = 16


def source_batch(packed: bool) -> dict[str, torch.Tensor]:
    """Two sequences with weights that are not representable in few bits (1/3, 0.3)."""
    batch = synthetic_batch(2, SEQ_LEN, 50, RoleWeights(1 / 3, 0.3), seed=11)
    if packed:
        batch["document_ids"] = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4, [0] * 9 + [1] * 7])
    return batch


def run(layouts: list[tuple], packed: bool) -> list[dict]:
    from megatron.core import parallel_state as ps

    out = []
    for layout in layouts:
        layout = ParallelLayout(*layout)
        init_model_parallel(layout)
        stages = range(layout.vpp) if layout.vpp else [None]
        for vp_stage in stages:
            iterator = iter([source_batch(packed)]) if ps.get_tensor_model_parallel_rank() == 0 else None
            try:
                batch, error = get_batch(iterator, vp_stage=vp_stage), None
            except NotImplementedError as e:  # a refusal is an outcome the tests check
                batch, error = None, str(e)
            out.append({
                "layout": str(layout),
                "vp_stage": vp_stage,
                "tp": ps.get_tensor_model_parallel_rank(),
                "pp": ps.get_pipeline_model_parallel_rank(),
                "cp": ps.get_context_parallel_rank(),
                "cp_size": ps.get_context_parallel_world_size(),
                "batch": batch,
                "error": error,
            })
    return out


def nll_from_sharded_logits(tp: int) -> torch.Tensor:
    """per_token_nll_from_logits on this TP rank's vocab shard of seeded full logits [2, 5, 16]."""
    from megatron.core import parallel_state as ps

    from wit_megatron.loss import per_token_nll_from_logits

    init_model_parallel(ParallelLayout(tp=tp))
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 16, generator=gen) * 4
    labels = torch.randint(0, 16, (2, 5), generator=gen)
    shard = logits.chunk(tp, dim=-1)[ps.get_tensor_model_parallel_rank()]
    return per_token_nll_from_logits(shard, labels)
