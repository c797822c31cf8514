"""Rank side of the training tests on converted checkpoints: load one at a layout, train, save the way
Megatron-LM does. `train_and_save`: one WIT step (SGD on the DDP gradients), reporting the trained
model's logits; `train_steps`: `train_step` with Megatron's Adam and clipping (KV-head replicas)."""

from __future__ import annotations

from pathlib import Path

import torch

from wit_megatron import checkpoint as ckpt
from wit_megatron.convert.verify import model_logits
from wit_megatron.model import GPTArch, build_model, check_layout, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.params import gather_full_grads
from wit_megatron.testing.synthetic import micro_batches, synthetic_batch
from wit_megatron.training.step import build_optimizer, build_scheduler, forward_backward, optimizer_config, train_step, wrap_ddp

SEQ_LEN = 16


def train_and_save(checkpoint: str, out: str, layout: tuple, tokens: torch.Tensor, lr: float = 0.5) -> dict:
    from megatron.core import parallel_state as ps

    root, directory = ckpt.resolve(Path(checkpoint))
    record = ckpt.read_record(root, directory)
    arch = GPTArch.from_dict(record["arch"])
    layout = ParallelLayout(*layout)
    init_model_parallel(layout)
    config = transformer_config(arch, layout)
    chunks = build_model(arch, config)
    missing, unexpected = ckpt.load_into_model(chunks, directory)
    model = wrap_ddp(chunks, config)

    data = synthetic_batch(4, SEQ_LEN, arch.tokenizer_vocab_size, RoleWeights(0.0, 0.3, 1.0), seed=3)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = 4 // dp
    iterators = [micro_batches(data, dp_rank * per_rank, (dp_rank + 1) * per_rank, 1)
                 if ps.get_tensor_model_parallel_rank() == 0 else None for _ in model]
    forward_backward(model, iterators, per_rank, 1, SEQ_LEN)
    with torch.no_grad():
        for chunk in model:
            for param in chunk.parameters():
                param.sub_(lr * param.main_grad.to(param.dtype))

    ckpt.save(model, Path(out), iteration=1, record=record, assets=root / ckpt.ASSETS)
    return {"logits": model_logits(model, arch, tokens), "missing": missing, "unexpected": unexpected}


def train_steps(jobs: list[dict]) -> list[dict]:
    """Every rank. Each job: {"checkpoint", "out", "layout", "steps", "clip_grad", "lr", "adam_eps"}: that
    many WIT steps through `train_step` (Megatron's Adam, clipping at `clip_grad`) on a converted
    checkpoint at `layout`, then a training save to `out`. Returns per job the reported grad norms and
    the gradients the first step used (full tensors of this stage's parameters, after clipping)."""
    from megatron.core import parallel_state as ps

    results = []
    for job in jobs:
        root, directory = ckpt.resolve(Path(job["checkpoint"]))
        record = ckpt.read_record(root, directory)
        arch = GPTArch.from_dict(record["arch"])
        layout = ParallelLayout(*job["layout"])
        check_layout(arch, layout)
        init_model_parallel(layout)
        config = transformer_config(arch, layout)
        chunks = build_model(arch, config)
        missing, unexpected = ckpt.load_into_model(chunks, directory)
        assert not missing and not unexpected, (missing, unexpected)
        model = wrap_ddp(chunks, config)
        steps = job["steps"]
        optimizer = build_optimizer(model, optimizer_config(model, lr=job["lr"], weight_decay=0.1, clip_grad=job["clip_grad"],
                                                            adam_eps=job["adam_eps"]))
        scheduler = build_scheduler(optimizer, job["lr"], 0.0, warmup_iters=0, decay_iters=steps, decay_style="cosine",
                                    weight_decay=0.1, global_batch_size=4)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = 4 // dp
        norms = []
        for step in range(steps):
            data = synthetic_batch(4, SEQ_LEN, arch.tokenizer_vocab_size, RoleWeights(0.2, 1.0), seed=10 + step)
            iterators = [micro_batches(data, dp_rank * per_rank, (dp_rank + 1) * per_rank, 1)
                         if ps.get_tensor_model_parallel_rank() == 0 else None for _ in model]
            report = train_step(model, optimizer, scheduler, iterators, per_rank, 1, SEQ_LEN, kv_replicas=arch.kv_replicas)
            norms.append(report["grad norm"])
            if step == 0:  # Megatron's FP32 optimizer steps on `main_grad` itself (clipped in place); ours clips before
                grads = gather_full_grads(model)
        ckpt.save(model, Path(job["out"]), iteration=steps, record=record, assets=root / ckpt.ASSETS)
        keep = ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
        results.append({"grad norms": norms, "grads": grads if keep else {}})
    return results
