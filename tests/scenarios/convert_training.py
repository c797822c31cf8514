"""Rank side of the training-checkpoint test: load a converted checkpoint at a layout, take one WIT
training step (SGD on the DDP gradients), save the way Megatron-LM does, and report the trained
model's logits."""

from __future__ import annotations

from pathlib import Path

import torch

from wit_megatron.convert import checkpoint as ckpt
from wit_megatron.convert.verify import model_logits
from wit_megatron.model import GPTArch, build_model, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.synthetic import micro_batches, synthetic_batch
from wit_megatron.train import forward_backward, wrap_ddp

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

    ckpt.save_training_checkpoint(model, Path(out), iteration=1, record=record, assets=root / ckpt.ASSETS)
    return {"logits": model_logits(model, arch, tokens), "missing": missing, "unexpected": unexpected}
