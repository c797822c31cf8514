"""WIT inside a Megatron-LM launch: what `megatron.training.pretrain()` takes, for a user's own
`pretrain_gpt.py` (examples/megatron_lm/pretrain_gpt_wit.py shows the whole script; docs/megatron_lm.md
the lines that change).

    add_wit_args                        extra_args_provider: λ per role, packing, output layer; refuses a launch
                                        without --calculate-per-token-loss or WIT data at parse time
    train_valid_test_datasets_provider  WITDataset through megatron-core's BlendedMegatronDatasetBuilder,
                                        from Megatron-LM's --data-path/--split/--train-data-path/...,
                                        --seq-length, --seed, --data-cache-path
    forward_step                        WIT's forward step (training.step), loss in the per-token form,
                                        output layer as --wit-loss-impl says (unfused or chunked)
    carry_record                        the converter's record into --save, so the run's saves export to HF

Everything else is Megatron-LM's: the model (as pretrain_gpt.py builds GPT), parallelism, optimizer,
schedule, checkpoints, logging. The loss needs `--calculate-per-token-loss`: Megatron then sums
(Σ w·NLL, N) over micro-batches and data-parallel ranks and divides by the global N, the paper's
normalization; without it Megatron divides each micro-batch by its own count and averages the
micro-batches (a mean of means), so WIT refuses to run.

Nothing here imports megatron.training at module level: the module imports with any megatron-core.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import torch

from wit_megatron.training import step
from wit_megatron.training.arguments import add_output_loss_arguments, add_wit_arguments, output_loss, role_weights

PER_TOKEN_LOSS_REQUIRED = (
    "WIT needs --calculate-per-token-loss: its loss is Σ w·NLL / N with N counted over the whole global batch "
    "(every micro-batch and data-parallel rank), which Megatron computes only in the per-token form; without "
    "the flag each micro-batch would be divided by its own count and the micro-batches averaged (a mean of "
    "means, not the paper's loss)")


SPIKY_LOSS_FACTOR = 10  # --check-for-spiky-loss: a loss 10x the largest seen so far, as pretrain_gpt.py flags it


class WITArgumentError(ValueError):
    """A Megatron-LM launch whose options cannot train WIT as asked."""


def add_wit_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`: adds --lambda-prompt, --lambda-response, --lambda-system/-user/
    -tool, --no-packing, --wit-loss-impl and --wit-loss-chunk-size (as examples/pretrain_wit.py has them),
    and makes the parser refuse what `check_wit_args` refuses: "PROG: error: MESSAGE" and exit status 2 on
    every rank, before any process group exists (without Megatron-LM's usage text, several hundred lines
    that would bury it)."""
    add_wit_arguments(parser)
    add_output_loss_arguments(parser)
    parse_known_args = parser.parse_known_args  # what parse_args calls; Megatron-LM calls either

    def parse_and_check(args=None, namespace=None):
        parsed, rest = parse_known_args(args, namespace)
        try:
            check_wit_args(parsed)
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        return parsed, rest

    parser.parse_known_args = parse_and_check
    return parser


def check_wit_args(args: argparse.Namespace) -> None:
    """Raise WITArgumentError (ValueError) for options WIT cannot train with: no
    --calculate-per-token-loss, bad λ or chunk size, no data or data not written by wit-preprocess-data."""
    from megatron.training.utils import get_blend_and_blend_per_split

    from wit_megatron.data.loader import check_blend

    if not args.calculate_per_token_loss:
        raise WITArgumentError(PER_TOKEN_LOSS_REQUIRED)
    try:
        role_weights(args)
        output_loss(args)
        if getattr(args, "mock_data", False):
            raise ValueError("--mock-data: WIT trains on data written by wit-preprocess-data (token and role files); "
                             "give --data-path")
        blend, blend_per_split = get_blend_and_blend_per_split(args)
        if blend is None and not any(blend_per_split or []):
            raise ValueError("WIT needs data: --data-path (or --train-data-path ...) with prefixes written by "
                             "wit-preprocess-data")
        for option, each in (("--data-path", blend), *zip(("--train-data-path", "--valid-data-path", "--test-data-path"),
                                                           blend_per_split or [])):
            if each is not None:
                check_blend(each, option)
    except ValueError as e:
        raise WITArgumentError(str(e)) from None


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron-LM's dataset provider: (train, valid, test) WITDatasets of the requested sizes, built by
    megatron-core's BlendedMegatronDatasetBuilder on tensor-parallel rank 0 of every pipeline stage (WIT's
    get_batch reads there and broadcasts; every stage needs the record boundaries of packed sequences),
    None elsewhere. Every virtual pipeline stage (`vp_stage`) reads the same samples."""
    from megatron.core import parallel_state as ps
    from megatron.training import get_args, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    from wit_megatron.data.dataset import WITDatasetConfig, build_datasets

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    check_vocabulary(args, [b for b in (blend, *(blend_per_split or [])) if b is not None])
    config = WITDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split if blend is not None else None, path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files, num_dataset_builder_threads=args.num_dataset_builder_threads,
        role_weights=role_weights(args), packing=not args.no_packing,
    )
    print_rank_0(f"> building WIT datasets (λ_p {args.lambda_prompt}, λ_r {args.lambda_response}, "
                 f"{'packed' if config.packing else 'one record per sequence'}) ...")
    train, valid, test = build_datasets(config, list(train_val_test_num_samples),
                                        is_built_on_rank=lambda: ps.get_tensor_model_parallel_rank() == 0)
    return train, valid, test


def check_vocabulary(args: argparse.Namespace, blends: list) -> None:
    """Refuse data tokenized with more ids than the model has embedding rows (Megatron-LM's padded
    vocabulary): the checkpoint would load, and the first larger id would fail deep inside the
    embedding. Each prefix's meta.json holds its tokenizer's vocabulary size."""
    import json

    from wit_megatron.data.indexed import meta_path

    rows = getattr(args, "padded_vocab_size", None)
    for prefixes, _ in blends if rows is not None else []:
        for prefix in prefixes:
            with open(meta_path(prefix)) as f:
                vocab = json.load(f).get("vocab_size")
            if vocab is not None and vocab > rows:
                raise WITArgumentError(
                    f"{prefix} was tokenized with a vocabulary of {vocab} ids, but the model has {rows} embedding rows "
                    f"(Megatron-LM's padded vocabulary from the tokenizer and --make-vocab-size-divisible-by): with "
                    f"--tokenizer-type NullTokenizer give --vocab-size {vocab} (docs/megatron_lm.md)")


# Every rank calls the provider (megatron-core's builder synchronises all ranks); the ranks that read
# data build the datasets (Megatron-LM's `is_distributed` provider protocol).
train_valid_test_datasets_provider.is_distributed = True


def forward_step(data_iterator, model):
    """Megatron-LM's forward step: WIT's (`training.step.forward_step`: get_batch, packed-sequence
    attention, per-token NLL through the output layer --wit-loss-impl names, the WIT loss terms), with
    Megatron-LM's checks of the loss (--check-for-nan-in-loss-and-grad, --check-for-spiky-loss). Refuses
    to run without --calculate-per-token-loss."""
    from megatron.training import get_args

    args = get_args()
    if not args.calculate_per_token_loss:
        raise WITArgumentError(PER_TOKEN_LOSS_REQUIRED)
    output, loss_func = step.forward_step(data_iterator, model, output_loss(args))
    return output, partial(_checked_loss, loss_func, args)


def _checked_loss(loss_func, args, output_tensor):
    """The WIT loss terms, checked as Megatron-LM's pretrain_gpt.py checks its loss on each rank before
    any reduction (a NaN or Inf stops the run; a spiky loss is flagged by the rerun state machine)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    loss, num_tokens, report = loss_func(output_tensor)
    rerun = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for rejected, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(result=loss, rejection_func=rejected, message=f"found {what} in local forward loss calculation",
                                  tolerance=0.0, fatal=True)
    if getattr(args, "check_for_spiky_loss", False):
        rerun.validate_result(result=loss, message="Spiky loss", tolerance=0.0, fatal=False, rejection_func=partial(
            rerun.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"))
    return loss, num_tokens, report


def carry_record(args: argparse.Namespace) -> None:
    """Copy the converted checkpoint's architecture record, Megatron-LM flags and HF tokenizer files
    from --load (or --pretrained-checkpoint) into --save, once, on global rank 0, so that the saves
    Megatron-LM writes there convert back with wit-convert-megatron-to-hf. Nothing to do without
    --save, or when --save already holds a record (a resumed run); says so when no checkpoint has one."""
    from wit_megatron import checkpoint

    if not args.save or int(os.environ.get("RANK", "0")) != 0 or (Path(args.save) / checkpoint.RECORD).exists():
        return
    for source in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if source and checkpoint.carry_record(Path(source), Path(args.save)):
            return
    print(f"WIT: neither --load nor --pretrained-checkpoint holds wit-convert-hf-to-megatron's record "
          f"({checkpoint.RECORD}): the saves in {args.save} will not convert to Hugging Face with "
          "wit-convert-megatron-to-hf", flush=True)
