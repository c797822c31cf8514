"""Rank-side code of the WIT parity tests: run one global batch under several parallel layouts.

Every rank calls `run(cases)`; weights are loaded from name-seeded full tensors, so every layout holds
the same model. Each case returns the reduced report (last pipeline stage) and the full gradients of
its stage (TP rank 0 of DP rank 0); the reference is computed afterwards on global rank 0 alone.
"""

from __future__ import annotations

import os

import torch

from wit_megatron.model import GPTArch, build_model, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.params import gather_full_grads, load_full_tensors, seeded_weights
from wit_megatron.testing.synthetic import micro_batches, synthetic_batch
from wit_megatron.training.step import forward_backward, wrap_ddp

ARCH = GPTArch(
    vocab_size=128, num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
    ffn_hidden_size=128, max_position_embeddings=64,
)
SEQ_LEN = 32
WEIGHT_SEED = 7


def make_batch(spec: dict) -> dict[str, torch.Tensor]:
    return synthetic_batch(
        spec["num_seqs"], SEQ_LEN, ARCH.vocab_size, RoleWeights(*spec["lambdas"]),
        seed=spec.get("seed", 0), prompt_only=spec.get("prompt_only", ()), lengths=spec.get("lengths"),
    )


def run_case(layout: tuple, micro_batch_size: int, batch: dict) -> dict:
    from megatron.core import parallel_state as ps

    layout = ParallelLayout(*layout)
    init_model_parallel(layout)
    config = transformer_config(ARCH, layout)
    chunks = build_model(ARCH, config)
    load_full_tensors(chunks, seeded_weights(WEIGHT_SEED))
    model = wrap_ddp(chunks, config)
    data = make_batch(batch)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = batch["num_seqs"] // dp
    assert per_rank % micro_batch_size == 0, (layout, micro_batch_size, per_rank)
    tp_rank = ps.get_tensor_model_parallel_rank()
    iterators = [
        micro_batches(data, dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch_size) if tp_rank == 0 else None
        for _ in model
    ]
    report = forward_backward(model, iterators, per_rank // micro_batch_size, micro_batch_size, SEQ_LEN)
    grads = gather_full_grads(model)
    keep = tp_rank == 0 and dp_rank == 0
    return {"layout": str(layout), "mbs": micro_batch_size, "report": report, "grads": grads if keep else None}


def reference(batch: dict) -> dict:
    """Single process, full logits: log_softmax, gather, Σ w·NLL / N, and autograd gradients."""
    init_model_parallel(ParallelLayout())
    if torch.distributed.get_rank() != 0:
        return None
    config = transformer_config(ARCH, ParallelLayout())
    (model,) = build_model(ARCH, config)
    load_full_tensors([model], seeded_weights(WEIGHT_SEED))
    data = make_batch(batch)
    logits = model(data["tokens"], data["position_ids"], None)  # [b, s, vocab]
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, data["labels"].unsqueeze(-1)).squeeze(-1)
    w = data["loss_weights"].double()
    n = int((w != 0).sum())
    loss = (w * nll).sum() / max(n, 1)
    loss.backward()
    mask = data["loss_mask"].bool()
    resp = data["response_mask"] & mask
    prompt = mask & ~data["response_mask"]
    return {
        "loss": loss.item(),
        "n": n,
        "prompt nll": (nll[prompt].sum() / prompt.sum()).item() if prompt.any() else 0.0,
        "response nll": (nll[resp].sum() / resp.sum()).item() if resp.any() else 0.0,
        "nll": nll.detach(),
        "weights": w,
        "grads": {name: p.grad.detach().float().clone() for name, p in model.named_parameters()},
    }


def run(cases: list[dict], references: list[dict] = ()) -> dict:
    """cases: {"layout": (tp, pp, vpp), "mbs": int, "batch": batch spec}; references: batch specs."""
    return {
        "cases": [run_case(c["layout"], c["mbs"], c["batch"]) for c in cases],
        "references": [reference(b) for b in references],
        "threads": len(os.listdir(f"/proc/{os.getpid()}/task")),  # after every layout switch of the launch
    }

