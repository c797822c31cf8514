"""The WIT training step over megatron-core parts: forward_step, DDP wrapping, one global-batch step."""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional, Sequence

import torch

from wit_megatron.batch import flatten_for_thd, get_batch, packed_attention_mask, packed_seq_params
from wit_megatron.loss import reduce_reports, wit_loss
from wit_megatron.model import unwrap


def forward_step(data_iterator: Optional[Iterator[dict]], model: torch.nn.Module):
    """Megatron-Core `forward_step_func`: one micro-batch through one model chunk, WIT loss on the last stage."""
    batch = get_batch(data_iterator, vp_stage=unwrap(model).vp_stage)
    tokens, position_ids, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    attention_mask, packed = None, None
    if batch["document_ids"] is not None:  # packed records: isolate attention per record
        if _uses_transformer_engine(model):
            # THD attention sees the micro-batch as one flat sequence with record boundaries.
            packed = packed_seq_params(batch["document_ids"])
            tokens, position_ids, labels = (flatten_for_thd(t) for t in (tokens, position_ids, labels))
        else:
            attention_mask = packed_attention_mask(batch["document_ids"])
    output = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed)
    if packed is not None and batch["loss_weights"] is not None:
        output = output.reshape(batch["loss_weights"].shape)  # back to [b, s] per-token losses
    return output, partial(_loss_func, batch)


def _uses_transformer_engine(model: torch.nn.Module) -> bool:
    """Whether the chunk was built with TE's layer spec (THD packing) or the local one (masks)."""
    inner = unwrap(model)
    if not hasattr(inner, "_wit_uses_te"):
        inner._wit_uses_te = any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in inner.modules())
    return inner._wit_uses_te


def _loss_func(batch: dict, per_token_nll: torch.Tensor):
    if batch["loss_weights"] is None:
        raise KeyError("the micro-batch has no 'loss_weights': the WIT loss needs float per-token weights")
    return wit_loss(per_token_nll, batch["loss_weights"], batch["loss_mask"], batch["response_mask"], check=False)


def wrap_ddp(chunks: Sequence[torch.nn.Module], config) -> list[torch.nn.Module]:
    """Megatron-Core DDP around each chunk, and the config hooks the schedules call.

    `finalize_model_grads` all-reduces gradients (summed: calculate_per_token_loss) and then divides
    them by the global count N of non-zero-weight targets.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def forward_backward(
    model: Sequence[torch.nn.Module],
    data_iterators: Sequence[Optional[Iterator[dict]]],
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_only: bool = False,
    forward_step_func=forward_step,
) -> dict[str, float]:
    """One global batch through Megatron's schedule. Gradients land in each param's `main_grad`,
    already divided by the global N. Returns the reduced report (see `reduce_reports`), identical on
    every rank of the last pipeline stage; {} elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=list(data_iterators) if len(model) > 1 else data_iterators[0],
        model=list(model) if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    return reduce_reports(reports, group=ps.get_data_parallel_group(with_context_parallel=True))


def build_optimizer(model: Sequence[torch.nn.Module], lr: float, weight_decay: float, clip_grad: float, train_iters: int, warmup_iters: int):
    """Megatron-Core's Adam (the paper's recipe: AdamW, cosine decay, warm-up) and its LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, clip_grad=clip_grad,
        adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        bf16=unwrap(model[0]).config.bf16, params_dtype=unwrap(model[0]).config.params_dtype,
    )
    optimizer = get_megatron_optimizer(config, list(model))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=0.0, lr_warmup_steps=warmup_iters,
        lr_decay_steps=train_iters, lr_decay_style="cosine", start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=train_iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, data_iterators, num_microbatches: int, micro_batch_size: int, seq_length: int) -> dict:
    """forward_backward over one global batch, then one optimizer step. Returns the report plus
    'grad norm' and 'lr' (the report is {} off the last pipeline stage)."""
    optimizer.zero_grad()
    report = forward_backward(model, data_iterators, num_microbatches, micro_batch_size, seq_length)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron's warm-up starts at 0)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return dict(report, **{"grad norm": grad_norm, "lr": lr})
