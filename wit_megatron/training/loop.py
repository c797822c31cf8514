"""The WIT training run: set-up from the parsed arguments, the loop, validation, checkpoints, stopping.

`pretrain(args)` runs on every rank of a launcher (torchrun; examples/pretrain_wit.py is the entry
point). The order of one iteration follows Megatron-LM's `train`: one optimizer step over a global
batch; then the log line (every --log-interval), validation (every --eval-interval), a save (every
--save-interval); then the stop checks (SIGTERM, --exit-duration-in-mins, --exit-interval), which
save first when --save is set.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch

from wit_megatron import checkpoint
from wit_megatron.data.loader import DataConfig, PaddedDataset, agreed_length, build_datasets, micro_batches, padded_length
from wit_megatron.model import build_model, preferred_layer_spec, transformer_config
from wit_megatron.runtime import kernels
from wit_megatron.runtime.parallel import init_distributed, init_model_parallel
from wit_megatron.training.arguments import TINY_FAMILY, output_loss
from wit_megatron.training.log import Interval, Logger
from wit_megatron.training.signals import StopRequests
from wit_megatron.training.step import (build_optimizer, build_scheduler, forward_backward, forward_step_for, optimizer_config,
                                        resume_overlap, sync_params, train_step, wrap_ddp)

EXIT_CODES = {"signal": 143}  # 128 + SIGTERM: the run did not finish; every other stop exits 0


class RunError(ValueError):
    """A run that cannot start or continue as asked (a mismatched resume, an impossible schedule)."""


@dataclass
class RunResult:
    """What a run did. The logs are the values of each log line / validation, on the last rank only."""

    iteration: int
    consumed_train_samples: int
    train_iters: int
    exit_reason: str  # finished, exit-interval, duration, signal
    train_log: list[dict] = field(default_factory=list)
    valid_log: list[dict] = field(default_factory=list)
    model: list = field(default_factory=list, repr=False)  # this rank's trained model chunks (DDP-wrapped)
    optimizer: object = field(default=None, repr=False)
    scheduler: object = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.exit_reason, 0)


def pretrain(args: argparse.Namespace, forward_step_func=None) -> RunResult:
    """Train as `args` (from `arguments.parse_args`) say, on every rank. Starts torch.distributed from the
    launcher's environment if it is not running yet. `forward_step_func`: megatron-core's forward step
    (default: WIT's, `training.step.forward_step`, with the output layer --wit-loss-impl names)."""
    from megatron.core import parallel_state as ps

    if forward_step_func is None:
        forward_step_func = forward_step_for(output_loss(args))

    init_distributed()
    init_model_parallel(args.layout, seed=args.seed)
    logger = Logger(args)
    record = _record(args)

    # Model: one GPTModel chunk per virtual pipeline stage, in Float16Module (bf16/fp16) and DDP.
    config = transformer_config(args.arch, args.layout, args.params_dtype, sequence_parallel=args.sequence_parallel,
                                recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                                recompute_num_layers=args.recompute_num_layers)
    spec = preferred_layer_spec(args.transformer_impl or record.get("layer_spec"))
    model = wrap_ddp(build_model(args.arch, config, kind=spec), config, args.use_distributed_optimizer,
                     args.overlap_grad_reduce, args.overlap_param_gather)
    logger.print(f"layer spec: {spec} | kernels: {kernels.in_use()} | parallel layout: {args.layout} dp{args.data_parallel_size} | "
                 f"precision: {str(args.params_dtype).removeprefix('torch.')} | "
                 f"λ_p {args.lambda_prompt}, λ_r {args.lambda_response}")

    # Data: the train and validation splits; with --train-epochs the iterations follow from the train split.
    reads_data = ps.get_tensor_model_parallel_rank() == 0
    data = _data_config(args)
    gbs = args.global_batch_size
    eval_samples = args.eval_iters * gbs if args.eval_iters else None
    weighted = any(blend is not None and blend[1] is not None for blend in [data.blend, *(data.blend_per_split or [])])
    train_ds, valid_ds = build_datasets(data, args.train_iters * gbs if args.train_iters else None,
                                        eval_samples if weighted else None, reads_data)
    train_iters = args.train_iters or math.ceil(agreed_length(train_ds) / gbs)
    if train_ds is not None:
        train_ds = PaddedDataset(train_ds, train_iters * gbs)
    valid_samples = min(eval_samples or 0, padded_length(agreed_length(valid_ds), gbs))
    if valid_ds is not None:
        valid_ds = PaddedDataset(valid_ds, valid_samples)

    # Optimizer and schedule (Megatron-LM's: counted in samples).
    optimizer = build_optimizer(model, optimizer_config(
        model, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_param_gather=args.overlap_param_gather,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis))
    decay_iters = args.lr_decay_iters or train_iters
    warmup_iters = args.lr_warmup_iters if args.lr_warmup_iters is not None else \
        (args.lr_warmup_fraction if args.lr_warmup_fraction is not None else 0.01) * decay_iters
    if warmup_iters >= decay_iters:
        raise RunError(f"the warm-up ({warmup_iters} iterations) must be shorter than the decay ({decay_iters} iterations, "
                       "--lr-decay-iters or all training iterations); lower --lr-warmup-iters/--lr-warmup-fraction")
    scheduler = build_scheduler(optimizer, args.lr, args.min_lr, warmup_iters, decay_iters, args.lr_decay_style,
                                args.weight_decay, gbs)

    # Weights, or the whole state of a run to resume.
    state = {"iteration": 0, "consumed_train_samples": 0, "data": _data_identity(args)}
    if args.checkpoint is not None:
        state = _load(args, model, optimizer, scheduler, state)
        logger.print(f"loaded {args.checkpoint.directory}" + (f": resuming after iteration {state['iteration']}, "
                                                              f"{state['consumed_train_samples']} samples consumed"
                                                              if state["iteration"] else " (weights)"))

    result = RunResult(state["iteration"], state["consumed_train_samples"], train_iters, "finished", model=model,
                       optimizer=optimizer, scheduler=scheduler)
    resumed_at = iteration = state["iteration"]
    consumed = state["consumed_train_samples"]
    if iteration < train_iters and train_ds is not None:
        train_iterators = micro_batches(train_ds, consumed, train_iters * gbs, args.micro_batch_size, args.num_workers,
                                        len(model))
    else:
        train_iterators = [None] * len(model)

    def save(at: int) -> None:
        sync_params(model)
        train_state = dict(state, iteration=at, consumed_train_samples=consumed, train_iters=train_iters)
        with_optimizer = not args.no_save_optim
        directory = checkpoint.save(model, args.save, at, record, optimizer=optimizer if with_optimizer else None,
                                    scheduler=scheduler if with_optimizer else None, train_state=train_state,
                                    assets=args.checkpoint.assets if args.checkpoint is not None else None)
        logger.print(f"saved {directory}")
        resume_overlap(model)

    def validate(at: int) -> None:
        if valid_samples:
            sync_params(model)
            values = logger.validation(_evaluate(model, valid_ds, valid_samples, args, forward_step_func), at, consumed)
            if logger.is_last_rank:
                result.valid_log.append(dict(values, iteration=at))
            resume_overlap(model)

    interval, saved, validated = Interval(), None, None
    with StopRequests(args.exit_duration_in_mins) as stop:
        while iteration < train_iters:
            began = time.perf_counter()
            report = train_step(model, optimizer, scheduler, train_iterators, args.num_microbatches, args.micro_batch_size,
                                args.seq_length, kv_replicas=args.arch.kv_replicas, forward_step_func=forward_step_func)
            iteration, consumed = iteration + 1, consumed + gbs
            interval.add(report, time.perf_counter() - began)
            if iteration % args.log_interval == 0 or iteration == train_iters:
                values = logger.training(interval, iteration, train_iters, consumed, report["lr"], report["loss scale"],
                                         report["grad norm"])
                if logger.is_last_rank:
                    result.train_log.append(dict(values, iteration=iteration))
                interval = Interval()
            if args.eval_interval and iteration % args.eval_interval == 0:
                validate(iteration)
                validated = iteration
            if args.save is not None and args.save_interval and iteration % args.save_interval == 0:
                save(iteration)
                saved = iteration
            reason = stop.agreed()
            if reason is None and args.exit_interval and iteration % args.exit_interval == 0 and iteration < train_iters:
                reason = "exit-interval"
            if reason is not None:
                result.exit_reason = reason
                logger.print(f"stopping after iteration {iteration}: {reason}")
                break
    result.iteration, result.consumed_train_samples = iteration, consumed
    sync_params(model)  # the trained weights, whole, from here on

    if result.exit_reason == "finished" and validated != iteration:
        validate(iteration)
    if args.save is not None and saved != iteration and iteration > resumed_at:
        save(iteration)
    if result.exit_reason == "finished" and args.save_hf is not None:
        _export_hf(args, logger)
    logger.close()
    return result


def _record(args) -> dict:
    """The architecture record the run's saves carry: the loaded checkpoint's, or one for the tiny model."""
    if args.checkpoint is not None:
        return dict(args.checkpoint.record)
    return checkpoint.make_record(TINY_FAMILY, args.arch, args.params_dtype, None)


def _data_config(args) -> DataConfig:
    return DataConfig(blend=args.blend, blend_per_split=args.blend_per_split, split=args.split, seq_length=args.seq_length,
                      seed=args.seed, role_weights=args.role_weights, packing=not args.no_packing,
                      train_epochs=args.train_epochs, cache_path=args.data_cache_path, num_workers=args.num_workers,
                      synthetic_vocab_size=args.arch.tokenizer_vocab_size)


def _data_identity(args) -> dict:
    """What the sample order depends on: a resumed run must have the same (λ may change: it is applied
    at load time and changes no sample)."""
    return {"blend": args.blend, "blend_per_split": args.blend_per_split, "split": args.split if args.blend else None,
            "seq_length": args.seq_length, "seed": args.seed, "packing": not args.no_packing,
            "train_epochs": args.train_epochs}


def _load(args, model, optimizer, scheduler, fresh: dict) -> dict:
    """A converted checkpoint (release) or --finetune: the weights, and fresh state. A training save: resume."""
    ck = args.checkpoint
    if ck.iteration is None or args.finetune:
        missing, unexpected = checkpoint.load_into_model(model, ck.directory)
        if missing or unexpected:
            raise checkpoint.CheckpointError(f"{ck.directory}: model keys missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        optimizer.reload_model_params()  # the fp32 main params (bf16/fp16) from the loaded weights
        return fresh
    load_optim = not args.no_load_optim
    state = checkpoint.load_training_state(model, ck, optimizer if load_optim else None, scheduler if load_optim else None,
                                           load_rng=not args.no_load_rng)
    if not load_optim:
        optimizer.reload_model_params()
        scheduler.step(increment=state["consumed_train_samples"])
    saved, now = _json_like(state.get("data")), _json_like(fresh["data"])
    if saved != now:
        changed = ", ".join(f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}" for key in sorted(set(saved) | set(now))
                            if saved.get(key) != now.get(key))
        raise RunError(f"{ck.directory}: the run would continue on other data than it was trained on ({changed}); "
                       "resume with the saved run's data options, or start a new run from its weights with --finetune")
    return dict(state, data=fresh["data"])


def _json_like(value):
    """Tuples as lists (a checkpoint's copy of the data identity went through pickling, not JSON)."""
    if isinstance(value, dict):
        return {k: _json_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_like(v) for v in value]
    return value


@torch.no_grad()
def _evaluate(model, valid_ds, samples: int, args, forward_step_func) -> Interval:
    """Forward only over the first `samples` validation samples (the same every time): exact sums."""
    for chunk in model:
        chunk.eval()
    iterators = micro_batches(valid_ds, 0, samples, args.micro_batch_size, 0, len(model)) if valid_ds is not None \
        else [None] * len(model)
    interval = Interval()
    for _ in range(samples // args.global_batch_size):
        interval.add(forward_backward(model, iterators, args.num_microbatches, args.micro_batch_size, args.seq_length,
                                      forward_only=True, forward_step_func=forward_step_func), 0.0)
    for chunk in model:
        chunk.train()
    return interval


def _export_hf(args, logger: Logger) -> None:
    """Rank 0 exports the final save to --save-hf (the converter, with the tokenizer and chat template)."""
    error = None
    if torch.distributed.get_rank() == 0:
        from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf

        try:
            convert_megatron_to_hf(args.save, args.save_hf, progress=False)
            print(f"exported {args.save} to {args.save_hf} (Hugging Face)", flush=True)
        except Exception as e:  # the others wait at the barrier; raise after it
            error = e
    torch.distributed.barrier()
    if error is not None:
        raise error
