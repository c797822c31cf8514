"""The training entry point's command line: Megatron-LM's option names and meanings, WIT's λ, and every
check that can be made before a process group exists.

Defaults reproduce the WIT paper's recipe: AdamW, lr 2e-5, cosine decay, 1% warm-up, weight decay 0.1,
one epoch, bf16 where the hardware has it (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from wit_megatron.output_loss import DEFAULT_CHUNK_SIZE, LOSS_IMPLS, OutputLoss
from wit_megatron.roles import RoleWeights

LAMBDA_HELP = ("WIT's per-token loss weights. Loss = Σ w·NLL / N over the global batch, w = λ of the target token's "
               "role, N = the targets with w ≠ 0. (0, 1) is conventional instruction tuning, (1, 1) full-sequence loss; "
               "the paper found λ_p 0-0.5 with λ_r 0.5-1 best")


def add_wit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """WIT's own options (λ per role, packing), the same in this entry point and in a Megatron-LM launch
    (wit_megatron.integrations.megatron_lm.add_wit_args)."""
    g = parser.add_argument_group("WIT")
    g.add_argument("--lambda-prompt", type=float, default=0.2, help="λ_p: weight of prompt tokens. " + LAMBDA_HELP)
    g.add_argument("--lambda-response", type=float, default=0.8, help="λ_r: weight of response tokens")
    for role in ("system", "user", "tool"):
        g.add_argument(f"--lambda-{role}", type=float, default=None,
                       help=f"weight of {role} tokens where the data labels them (chat data); default: λ_p")
    g.add_argument("--no-packing", action="store_true",
                   help="one record per sequence (the paper's setting) instead of packing several with per-record attention")
    return parser


def add_output_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--wit-loss-impl and --wit-loss-chunk-size, the same in this entry point and in a Megatron-LM launch."""
    g = parser.add_argument_group("WIT output layer")
    g.add_argument("--wit-loss-impl", choices=LOSS_IMPLS, default="unfused",
                   help="the last stage's output layer and cross entropy. unfused: megatron-core's (logits of every "
                   "position); chunked: only targets of non-zero weight, --wit-loss-chunk-size tokens at a time, logits "
                   "recomputed in the backward pass unless they fit in one chunk (much less memory; during training "
                   "the prompt NLL in the log covers only prompt targets of non-zero weight: none at λ_p = 0; "
                   "validation covers all). See docs/output-loss.md")
    g.add_argument("--wit-loss-chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help="--wit-loss-impl chunked: tokens whose logits exist at one time (float32 logits of a chunk: "
                   "chunk x vocab / TP x 4 bytes)")
    return parser


def output_loss(args: argparse.Namespace) -> OutputLoss:
    """The output layer `add_output_loss_arguments`' options pick (refuses a chunk size < 1: ValueError);
    their defaults where `args` lacks them (a Megatron-LM launch configured without WIT's parser)."""
    return OutputLoss(getattr(args, "wit_loss_impl", "unfused"), getattr(args, "wit_loss_chunk_size", DEFAULT_CHUNK_SIZE))


def role_weights(args: argparse.Namespace) -> RoleWeights:
    """λ per role from `add_wit_arguments`' options (refuses λ < 0, non-finite, all zero: ValueError)."""
    return RoleWeights(args.lambda_prompt, args.lambda_response, args.lambda_system, args.lambda_user, args.lambda_tool)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_wit.py",
        description="WIT fine-tuning with Megatron-Core. Long options are Megatron-LM's (names and meanings); defaults "
        "reproduce the WIT paper's recipe (AdamW lr 2e-5, cosine, 1% warm-up, weight decay 0.1, 1 epoch, bf16 where "
        "the hardware has it). The architecture comes from --load's checkpoint record.",

        allow_abbrev=False,
    )
    add_wit_arguments(p)
    add_output_loss_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    vpp = g.add_mutually_exclusive_group()
    vpp.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int, default=None,
                     help="model chunks per pipeline rank (interleaved schedule)")
    vpp.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                     help="layers per model chunk (interleaved schedule); an alternative to --vpp")
    g.add_argument("--context-parallel-size", "--cp", dest="cp", type=int, default=1,
                   help="context parallelism (GPU only: its attention needs Transformer Engine)")
    g.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (GPU only: needs TE norms)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state and fp32 main params over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: gather updated parameters during the next forward pass")

    g = p.add_argument_group("batches and iterations")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=64, help="sequences per optimizer step (the paper: 64)")
    g.add_argument("--seq-length", type=int, default=4096, help="sequence length (the paper's max length: 4096)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--train-iters", type=int, default=None, help="optimizer steps")
    length.add_argument("--train-epochs", type=int, default=None,
                        help="epochs over the train split (every record once per epoch, reshuffled per epoch); "
                        "default: 1 when neither this nor --train-iters is given")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: all training iterations")
    warmup = g.add_mutually_exclusive_group()
    warmup.add_argument("--lr-warmup-fraction", type=float, default=None, help="of --lr-decay-iters; default 0.01")
    warmup.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)

    g = p.add_argument_group("mixed precision")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 params with fp32 main params (the default where "
                           "the GPU supports bf16)")
    precision.add_argument("--fp16", action="store_true", help="fp16 params, fp32 main params, loss scaling")
    precision.add_argument("--fp32", action="store_true", help="fp32 throughout (the default without a bf16 GPU)")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale; default: dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", type=Path, default=None,
                   help="a checkpoint: converted by wit-convert-hf-to-megatron (starts at iteration 0 with fresh optimizer "
                   "state) or saved by this script (resumes it). Default: a tiny random model (the plumbing demo)")
    g.add_argument("--finetune", action="store_true",
                   help="load --load's weights only: iteration, optimizer, scheduler and data position start fresh")
    g.add_argument("--no-load-optim", action="store_true", help="resume without the saved optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the saved RNG states")
    g.add_argument("--save", type=Path, default=None, help="save checkpoints here (Megatron-LM's layout, torch_dist)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and after the last)")
    g.add_argument("--no-save-optim", action="store_true", help="save weights only (such a save resumes only with --no-load-optim)")
    g.add_argument("--save-hf", type=Path, default=None,
                   help="after training, export the final save to a Hugging Face model directory here (needs --save)")
    g.add_argument("--transformer-impl", "--layer-spec", dest="transformer_impl",
                   choices=["transformer_engine", "te", "local"], default=None,
                   help="transformer_engine (te): Transformer Engine's layer spec where TE and a GPU are present, else the "
                   "local spec; local: always the local (torch) spec. Default: what the converter recorded in --load")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="prefixes written by wit-preprocess-data, split by --split: 'P' or 'W1 P1 W2 P2 ...' "
                   "(Megatron's blend syntax). Default: the synthetic task (no --load) ")
    g.add_argument("--train-data-path", nargs="+", default=None, help="the train split's blend (instead of --data-path)")
    g.add_argument("--valid-data-path", nargs="+", default=None, help="the validation split's blend")
    g.add_argument("--split", default="100,0,0",
                   help="train,valid,test proportions of --data-path's records (the paper trains on all of them)")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes per data-reading rank")
    g.add_argument("--data-cache-path", default=None, help="where dataset indices are cached (default: next to the data)")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="train on data whose tokenizer (recorded by wit-preprocess-data) differs from the one --load's "
                   "checkpoint carries (vocabulary size, special ids, fingerprint); refused otherwise")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations (and after the last)")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per validation, the same ones every time (at most the whole validation split)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", type=Path, default=None)
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases (needs wandb installed)")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)

    g = p.add_argument_group("exit")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after an iteration divisible by N (saving first)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="stop after this many minutes (saving first)")

    g = p.add_argument_group("tiny random model (without --load)")
    g.add_argument("--num-layers", type=int, default=None, help="default 4")
    g.add_argument("--hidden-size", type=int, default=None, help="default 128")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, default=None, help="default 8")
    g.add_argument("--num-query-groups", type=int, default=None, help="default 4")
    g.add_argument("--vocab-size", type=int, default=None, help="default 256")
    for action in p._actions:  # every default in --help (argparse's formatter shows them only with a help text)
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
    return p


TINY_FAMILY = "tiny-random"  # the record family of the tiny random model's saves
TINY_MODEL = {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 8, "num_query_groups": 4, "vocab_size": 256}
_POSITIVE = ("tp", "pp", "cp", "micro_batch_size", "global_batch_size", "seq_length", "train_iters", "train_epochs",
             "save_interval", "eval_interval", "log_interval", "exit_interval", "vpp", "num_layers_per_virtual_pipeline_stage",
             "lr_decay_iters", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "vocab_size", "recompute_num_layers", "wit_loss_chunk_size")
_NON_NEGATIVE = ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps", "lr_warmup_iters", "num_workers", "eval_iters",
                 "exit_duration_in_mins", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and check the command line (argparse's error and exit 2 on anything wrong), before any
    process group or model exists. `world_size`: the launcher's (WORLD_SIZE), default 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        parser.error(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        for note in args.data_notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    return args


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Refuse bad values and combinations (ValueError naming the option and the valid values), and
    fill in what follows from the rest: the architecture, precision, role weights, the data blends."""
    from wit_megatron import checkpoint
    from wit_megatron.data.loader import parse_blend
    from wit_megatron.model import GPTArch, LayoutError, check_layout
    from wit_megatron.runtime.parallel import ParallelLayout

    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be finite and >= 0, got {value}")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction <= 1:
        raise ValueError(f"--lr-warmup-fraction must be within [0, 1], got {args.lr_warmup_fraction}")
    decay = args.lr_decay_iters or args.train_iters  # None with --train-epochs: known once the data is read
    if decay is not None:
        if args.lr_warmup_iters is not None and args.lr_warmup_iters >= decay:
            raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay iterations ({decay}: "
                             "--lr-decay-iters, else --train-iters)")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    args.role_weights = role_weights(args)

    # Model: from the checkpoint record, or the tiny random model.
    tiny = {name: getattr(args, name) for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                   "num_query_groups", "vocab_size")}
    args.checkpoint = None
    if args.load is not None:
        given = [f"--{name.replace('_', '-')}" for name, value in tiny.items() if value is not None]
        if given:
            raise ValueError(f"{' '.join(given)}: the architecture comes from --load's checkpoint record; drop them")
        try:
            args.checkpoint = checkpoint.open_checkpoint(args.load)
        except checkpoint.CheckpointError as e:
            raise ValueError(f"--load: {e}") from None
        args.arch = args.checkpoint.arch
    else:
        if args.finetune:
            raise ValueError("--finetune needs --load")
        if args.data_path or args.train_data_path:
            raise ValueError("--data-path needs --load: the model must be the one the data was tokenized for")
        sizes = {**TINY_MODEL, **{k: v for k, v in tiny.items() if v is not None}}
        sizes["ffn_hidden_size"] = sizes.get("ffn_hidden_size") or 4 * sizes["hidden_size"]
        if sizes["hidden_size"] % sizes["num_attention_heads"] or sizes["num_attention_heads"] % sizes["num_query_groups"]:
            raise ValueError(f"--hidden-size {sizes['hidden_size']}, --num-attention-heads {sizes['num_attention_heads']} "
                             f"and --num-query-groups {sizes['num_query_groups']}: heads must divide hidden and groups heads")
        args.arch = GPTArch(max_position_embeddings=args.seq_length, **sizes)

    # Layout.
    vpp = args.vpp
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_rank, rest = divmod(args.arch.num_layers, args.pp)
        if rest or per_rank % args.num_layers_per_virtual_pipeline_stage:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage} does not "
                             f"divide the {args.arch.num_layers} layers over --pp {args.pp}")
        vpp = per_rank // args.num_layers_per_virtual_pipeline_stage
    if vpp is not None and args.pp < 2:
        raise ValueError("a virtual pipeline (--vpp) needs --pp >= 2")
    args.layout = ParallelLayout(args.tp, args.pp, vpp if vpp and vpp > 1 else None, args.cp)
    try:
        args.data_parallel_size = args.layout.data_parallel_size(world_size)
        check_layout(args.arch, args.layout)
    except (ValueError, LayoutError) as e:
        raise ValueError(f"--tp/--pp/--vpp/--cp at {world_size} processes: {e}") from None
    if args.cp > 1 and not torch.cuda.is_available():
        raise ValueError("--context-parallel-size > 1 needs GPUs: megatron-core's context-parallel attention runs on "
                         "Transformer Engine")
    if args.sequence_parallel and (args.tp < 2 or not torch.cuda.is_available()):
        raise ValueError("--sequence-parallel needs --tp >= 2 and GPUs (Transformer Engine or apex norms)")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}; "
                         f"valid: multiples of {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.layout.vpp and args.num_microbatches % args.pp:
        raise ValueError(f"the interleaved schedule (--vpp) needs the micro-batches per step ({args.num_microbatches}) "
                         f"to be a multiple of --pp {args.pp}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer (it gathers the optimizer's shards)")
    if args.arch.kv_replicas > 1 and args.use_distributed_optimizer:
        raise ValueError("--use-distributed-optimizer with a checkpoint holding KV-head copies (--kv-replicas) is not "
                         "supported: the copies' gradients are summed on whole gradients, which it shards")
    if args.arch.kv_replicas > 1 and args.fp16:
        raise ValueError("--fp16 with KV-head copies (--kv-replicas) is not supported: their gradient step needs unscaled "
                         "gradients; use --bf16")

    # Precision: bf16 where the GPU has it, else fp32 (CPU), unless chosen.
    if not (args.bf16 or args.fp16 or args.fp32):
        args.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ValueError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        raise ValueError("--recompute-granularity full needs --recompute-method (uniform|block) and --recompute-num-layers")

    # Data.
    if args.data_path and (args.train_data_path or args.valid_data_path):
        raise ValueError("give --data-path (split by --split) or --train-data-path/--valid-data-path, not both")
    if args.valid_data_path and not args.train_data_path:
        raise ValueError("--valid-data-path needs --train-data-path")
    try:
        split = [float(x) for x in args.split.replace("/", ",").split(",")]
    except ValueError:
        split = []
    if not 1 <= len(split) <= 3 or any(not math.isfinite(x) or x < 0 for x in split) or sum(split) <= 0:
        raise ValueError(f"--split {args.split!r}: expected up to three proportions, e.g. 98,2,0")
    args.blend = parse_blend(args.data_path, "--data-path")
    args.blend_per_split = None
    if args.train_data_path:
        args.blend_per_split = [parse_blend(args.train_data_path, "--train-data-path"),
                                parse_blend(args.valid_data_path, "--valid-data-path"), None]
    args.synthetic = args.blend is None and args.blend_per_split is None
    if args.data_cache_path is not None and os.path.isdir(args.data_cache_path):
        from wit_megatron.data.dataset import check_cached_indices

        check_cached_indices(args.data_cache_path)  # megatron-core 0.16 would unpickle a planted file there
    args.data_notes = []
    if not args.synthetic and args.checkpoint is not None:  # readable, ids inside the vocabulary, the same tokenizer
        from wit_megatron.data.model_fit import check_data_fits_model

        blends = zip(("--data-path", "--train-data-path", "--valid-data-path"), [args.blend, *(args.blend_per_split or [])])
        datasets = [(option, prefix) for option, blend in blends if blend is not None for prefix in blend[0]]
        args.data_notes = check_data_fits_model(datasets, args.checkpoint, args.allow_tokenizer_mismatch)
    tiny_model = args.checkpoint is None or args.checkpoint.record.get("family") == TINY_FAMILY
    if args.synthetic and not tiny_model:
        raise ValueError("--load of a converted model needs --data-path (or --train-data-path): the synthetic task is "
                         "for the tiny random model")
    if args.synthetic and args.train_iters is None:
        if args.train_epochs is not None:
            raise ValueError("--train-epochs needs data (--data-path); the synthetic task takes --train-iters")
        args.train_iters = 20
    weighted = args.blend is not None and args.blend[1] is not None or \
        args.blend_per_split is not None and args.blend_per_split[0][1] is not None
    if args.train_iters is None:
        if weighted:
            raise ValueError("a weighted blend defines a sampling mix, not epochs: give --train-iters")
        args.train_epochs = args.train_epochs or 1

    # Checkpoints and intervals.
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save")
    if args.save_hf is not None and args.save is None:
        raise ValueError("--save-hf needs --save (the final save is what is exported)")
    if args.save is not None and args.load is not None and Path(args.save).resolve() == args.checkpoint.root.resolve() \
            and args.checkpoint.iteration is None:
        raise ValueError(f"--save {args.save} is --load's converted checkpoint; save training to another directory")
    if args.save_hf is not None and Path(args.save_hf).exists():
        raise ValueError(f"--save-hf {args.save_hf} exists; give a new directory")
    for option, value, package in (("--tensorboard-dir", args.tensorboard_dir, "tensorboard"),
                                   ("--wandb-project", args.wandb_project, "wandb")):
        if value is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"{option} needs the {package} package (pip install {package})")
    if args.transformer_impl == "transformer_engine":
        args.transformer_impl = "te"
