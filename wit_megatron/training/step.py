"""The WIT training step over megatron-core parts: forward_step, model wrapping, optimizer and scheduler,
one global-batch step."""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional, Sequence

import torch

from wit_megatron.batch import flatten_for_thd, get_batch, packed_attention_mask, packed_seq_params
from wit_megatron.loss import reduce_reports, wit_loss
from wit_megatron.model import unwrap
from wit_megatron.output_loss import OutputLoss, chunked_model_forward, targets_to_compute


def forward_step(data_iterator: Optional[Iterator[dict]], model: torch.nn.Module, output_loss: OutputLoss = OutputLoss()):
    """Megatron-Core `forward_step_func`: one micro-batch through one model chunk, WIT loss on the last stage.
    `output_loss` picks the last stage's output layer and cross entropy (see `forward_step_for`)."""
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
    if output_loss.chunked:  # only the targets it computes: their mask replaces loss_mask in the loss terms
        select = None if batch["loss_weights"] is None else targets_to_compute(batch["loss_weights"], batch["loss_mask"])
        output = chunked_model_forward(model, tokens, position_ids, attention_mask, labels,
                                       None if select is None else select.reshape(labels.shape), output_loss.chunk_size, packed)
        batch = dict(batch, loss_mask=select)
    else:
        output = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed)
    if packed is not None and batch["loss_weights"] is not None:
        output = output.reshape(batch["loss_weights"].shape)  # back to [b, s] per-token losses
    return output, partial(_loss_func, batch)


def forward_step_for(output_loss: OutputLoss):
    """The forward step for `--wit-loss-impl` / `--wit-loss-chunk-size`."""
    return forward_step if not output_loss.chunked else partial(forward_step, output_loss=output_loss)


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


def wrap_ddp(chunks: Sequence[torch.nn.Module], config, use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False) -> list[torch.nn.Module]:
    """Megatron-Core DDP around each chunk (inside megatron-core's Float16Module when the config is bf16
    or fp16, as Megatron-LM wraps it), and the config hooks the schedules call, as Megatron-LM sets them.

    `finalize_model_grads` all-reduces gradients (summed: calculate_per_token_loss), or reduce-scatters
    them to their owners with the distributed optimizer, and then divides them by the global count N
    of non-zero-weight targets. `overlap_grad_reduce` starts each bucket's reduction during the backward
    pass; `overlap_param_gather` (distributed optimizer) gathers the updated parameters during the next
    forward pass (call `sync_params` before reading or saving them).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                               overlap_param_gather=overlap_param_gather,
                                               use_distributed_optimizer=use_distributed_optimizer)
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]

    def per_chunk(funcs):
        return funcs if len(funcs) > 1 else funcs[0]

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk([m.no_sync for m in wrapped])
    if overlap_grad_reduce:
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in wrapped])
    return wrapped


def sync_params(model: Sequence[torch.nn.Module]) -> None:
    """With overlapped parameter gathering, finish gathering the last update now (before validation,
    a save or the end of training) and gather at once from then on; `resume_overlap` turns it back on."""
    for chunk in model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.disable_forward_pre_hook()


def resume_overlap(model: Sequence[torch.nn.Module]) -> None:
    for chunk in model:
        if chunk.ddp_config.overlap_param_gather:
            chunk.enable_forward_pre_hook()


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


def optimizer_config(model: Sequence[torch.nn.Module], **fields):
    """megatron-core's OptimizerConfig for `model`: Adam (AdamW: decoupled weight decay) by default,
    precision (bf16/fp16 with fp32 main params, fp16's loss scaler) taken from the model's config."""
    from megatron.core.optimizer import OptimizerConfig

    config = unwrap(model[0]).config
    defaults = dict(optimizer="adam", min_lr=0.0, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype)
    return OptimizerConfig(**dict(defaults, **fields))


def build_optimizer(model: Sequence[torch.nn.Module], config):
    """megatron-core's optimizer over the model chunks (the distributed optimizer when the config asks).
    The schedules scale each micro-batch's loss by its loss scale (fp16), as Megatron-LM sets up."""
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(config, list(model))
    unwrap(model[0]).config.grad_scale_func = optimizer.scale_loss  # one config object for all chunks
    return optimizer


def build_scheduler(optimizer, lr: float, min_lr: float, warmup_iters: float, decay_iters: int, decay_style: str,
                    weight_decay: float, global_batch_size: int):
    """megatron-core's OptimizerParamScheduler as Megatron-LM sets it up for an iteration budget: counted in
    samples (`train_step` steps it by the global batch), linear warm-up from 0 over `warmup_iters`, then
    decay to `min_lr` by `decay_iters` in `decay_style`; constant weight decay. A resumed run must use
    the saved schedule (its values are checked on load, not silently taken from the checkpoint)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_iters * global_batch_size,
        lr_decay_steps=decay_iters * global_batch_size, lr_decay_style=decay_style, start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=decay_iters * global_batch_size, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
    )


def train_step(model, optimizer, scheduler, data_iterators, num_microbatches: int, micro_batch_size: int, seq_length: int,
               kv_replicas: int = 1, forward_step_func=forward_step) -> dict:
    """One optimizer step over one global batch: forward_backward, the KV-copy gradient step (only with
    KV-head copies), the optimizer step, the scheduler step (not after a skipped fp16 step).

    Returns the report (see `reduce_reports`; {} off the last pipeline stage) plus 'grad norm', 'lr'
    (the rate this step used), 'loss scale' and 'skipped' (an fp16 step skipped on inf/NaN gradients)."""
    optimizer.zero_grad()
    report = forward_backward(model, data_iterators, num_microbatches, micro_batch_size, seq_length,
                              forward_step_func=forward_step_func)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron's warm-up starts at 0)
    if kv_replicas > 1:
        update_successful, grad_norm = step_with_kv_replicas(model, optimizer, kv_replicas)
    else:
        update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        from megatron.core import parallel_state as ps

        scheduler.step(increment=num_microbatches * micro_batch_size * ps.get_data_parallel_world_size())
    return dict(report, **{"grad norm": grad_norm, "lr": lr, "loss scale": float(optimizer.get_loss_scale()),
                           "skipped": not update_successful})


def step_with_kv_replicas(model, optimizer, kv_replicas: int) -> tuple[bool, float]:
    """The optimizer step of a model holding `kv_replicas` copies of each HF KV head
    (`GPTArch.kv_replicas`): the copies' gradients are summed first (`sum_kv_replica_grads`) and
    clipped by the unreplicated model's norm, so the step is the unreplicated model's up to float
    summation order and the copies stay identical. Needs unscaled gradients in every param's
    `main_grad` (fp32/bf16 with the plain optimizer; the training arguments refuse the rest)."""
    config = optimizer.config  # one object, shared by the chained optimizers (0.16 and 0.19)
    clip_grad = config.clip_grad
    grad_norm = sum_kv_replica_grads(model, kv_replicas, clip_grad)
    config.clip_grad = 0.0  # clipped above by the true norm; Megatron's would be inflated by the copies
    try:
        update_successful = optimizer.step()[0]
    finally:
        config.clip_grad = clip_grad
    return update_successful, grad_norm


@torch.no_grad()
def sum_kv_replica_grads(model: Sequence[torch.nn.Module], kv_replicas: int, clip_grad: float) -> float:
    """Give every copy of an HF KV head (`GPTArch.kv_replicas`) the gradient of the HF head itself, then
    clip all gradients by their true norm; returns that norm. Runs on every rank, after forward_backward.

    A copy's K/V rows only get the gradient through its own query heads; the HF head's gradient is the
    sum over its copies. Copies are consecutive query groups, several on one rank and/or spread over the
    TP group: the sums are accumulated per HF head here, all-reduced over TP and written back into every
    copy, so all copies take the same step and stay bitwise identical. The norm counts each HF head
    once (Megatron's optimizer counts every copy) and is clipped to `clip_grad` (0: off) the way
    Megatron's optimizer clips: the step must then run with Megatron's clipping off. Gradients must be
    unscaled (fp32 / bf16; fp16 loss scaling would scale the norm)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    square, grads = torch.zeros(1, dtype=torch.float64), []
    for chunk in model:
        config = unwrap(chunk).config
        groups = config.num_query_groups // tp_size  # query groups on this rank
        d = config.kv_channels
        q_rows = config.num_attention_heads // config.num_query_groups * d
        group = tp_rank * groups + torch.arange(groups)  # their global index
        head, extra = group // kv_replicas, group % kv_replicas > 0  # HF KV head; copies beyond each head's first
        for name, param in unwrap(chunk).named_parameters():
            grad = param.main_grad
            grads.append(grad)
            if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
                kv = grad.view(groups, q_rows + 2 * d, -1)[:, q_rows:]  # [groups, K and V rows, ...]: a view
                sums = kv.new_zeros(config.num_query_groups // kv_replicas, *kv.shape[1:]).index_add_(0, head, kv)
                torch.distributed.all_reduce(sums, group=ps.get_tensor_model_parallel_group())
                kv.copy_(sums[head])
                square -= kv[extra].double().square().sum()  # the norm counts each HF head once
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):  # as Megatron's norm
                square += grad.double().square().sum()
    torch.distributed.all_reduce(square, group=ps.get_model_parallel_group())
    norm = square.sqrt().item()
    coefficient = clip_grad / (norm + 1e-6)  # as Megatron's clip_grad_by_total_norm_fp32
    if clip_grad > 0 and coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return norm
