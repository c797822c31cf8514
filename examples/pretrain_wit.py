"""WIT fine-tuning with Megatron-Core, top to bottom.

    torchrun --nproc-per-node 4 examples/pretrain_wit.py --tp 2 --pp 2 \\
        --load CKPT --data-path DATA_PREFIX --lambda-prompt 0.2 --lambda-response 0.8 --save OUT

Loss = Σ w·NLL / N over the global batch, w = λ_p on prompt tokens and λ_r on response tokens,
N = the number of targets with w ≠ 0. `--load` takes a checkpoint written by
`wit-convert-hf-to-megatron` (or saved by this script); the architecture comes from the checkpoint.
`--data-path` takes prefixes written by `wit-preprocess-data`. Without them a tiny model trains on
synthetic instruction batches (the plumbing demo). On a machine without GPUs everything runs over gloo
with the CPU layer; on GPUs it takes the normal NCCL / Transformer Engine path.
"""

import argparse
import time
from pathlib import Path

import torch

from wit_megatron.model import GPTArch, LayoutError, build_model, check_layout, layer_spec, preferred_layer_spec, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_distributed, init_model_parallel
from wit_megatron.train import build_optimizer, train_step, wrap_ddp


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--vpp", type=int, default=None, help="model chunks per pipeline rank (interleaved schedule)")
    g = p.add_argument_group("WIT")
    g.add_argument("--lambda-prompt", type=float, default=0.2, help="λ_p: weight of prompt tokens")
    g.add_argument("--lambda-response", type=float, default=0.8, help="λ_r: weight of response tokens")
    g = p.add_argument_group("model and data")
    g.add_argument("--load", type=Path, help="Megatron checkpoint (converted or saved by this script); default: a tiny random model")
    g.add_argument("--data-path", nargs="+", help="preprocessed prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'; default: synthetic batches")
    g.add_argument("--split", default="100,0,0", help="train,valid,test proportions of each prefix (Megatron's --split)")
    g.add_argument("--no-packing", action="store_true", help="one record per sequence instead of packing several")
    g.add_argument("--layer-spec", choices=["te", "local"],
                   help="te: Transformer Engine's layer spec where TE and a GPU are present, else the local spec; local: always "
                   "the local (torch) spec. Default: what the converter recorded in --load's checkpoint, else te")
    g.add_argument("--save", type=Path, help="save the trained weights here (Megatron-LM layout, torch_dist) after the last step")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--global-batch-size", type=int, default=16, help="sequences per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--warmup-iters", type=int, default=2)
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("tiny random model (without --load)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--num-query-groups", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=256)
    return p.parse_args()


def main():
    args = parse_args()
    weights = RoleWeights(args.lambda_prompt, args.lambda_response)
    if args.save and not args.load:
        raise SystemExit("--save needs --load: the saved checkpoint keeps the loaded model's architecture record and tokenizer")
    init_distributed()
    layout = ParallelLayout(args.tp, args.pp, args.vpp)

    # Architecture: from the checkpoint's record, or the tiny demo model.
    record = None
    if args.load:
        from wit_megatron.convert.checkpoint import read_record, resolve

        record = read_record(*resolve(args.load))
        arch, dtype = GPTArch.from_dict(record["arch"]), getattr(torch, record["dtype"])
    else:
        arch, dtype = GPTArch(
            vocab_size=args.vocab_size, num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
            ffn_hidden_size=4 * args.hidden_size, max_position_embeddings=args.seq_length,
        ), torch.float32
    try:
        check_layout(arch, layout)
    except LayoutError as e:
        raise SystemExit(f"error: {e}")
    init_model_parallel(layout, seed=args.seed)

    from megatron.core import parallel_state as ps

    # Model: one GPTModel chunk per virtual pipeline stage, weights loaded at this layout, in Megatron-Core DDP.
    config = transformer_config(arch, layout, dtype)
    spec_kind = preferred_layer_spec(args.layer_spec or (record or {}).get("layer_spec"))
    chunks = build_model(arch, config, spec=layer_spec(arch, spec_kind))
    if torch.distributed.get_rank() == 0:
        print(f"layer spec: {spec_kind}", flush=True)
    if args.load:
        from wit_megatron.convert.checkpoint import load_into_model

        missing, unexpected = load_into_model(chunks, args.load)
        if missing or unexpected:
            raise SystemExit(f"{args.load}: checkpoint keys missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model = wrap_ddp(chunks, config)
    optimizer, scheduler = build_optimizer(model, args.lr, args.weight_decay, args.clip_grad, args.train_iters, args.warmup_iters)

    # Data: every global batch is split over data-parallel ranks, then into micro-batches.
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = args.global_batch_size // dp_size
    num_microbatches = per_rank // args.micro_batch_size
    if per_rank * dp_size != args.global_batch_size or num_microbatches * args.micro_batch_size != per_rank:
        raise SystemExit(
            f"global batch {args.global_batch_size} must be a multiple of data-parallel size {dp_size} "
            f"x micro-batch size {args.micro_batch_size}"
        )
    reads_data = ps.get_tensor_model_parallel_rank() == 0
    global_batch = make_global_batches(args, arch, weights, reads_data)

    def rank_micro_batches(step: int):
        batch = global_batch(step)
        rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank, args.micro_batch_size)
        return ({k: v[i : i + args.micro_batch_size] for k, v in batch.items()} for i in rows)

    logs_here = ps.is_pipeline_last_stage(ignore_virtual=True) and dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0

    # Training loop.
    for step in range(1, args.train_iters + 1):
        start = time.perf_counter()
        iterators = [rank_micro_batches(step - 1) if reads_data else None for _ in model]
        report = train_step(model, optimizer, scheduler, iterators, num_microbatches, args.micro_batch_size, args.seq_length,
                            kv_replicas=arch.kv_replicas)
        if logs_here:
            print(
                f"step {step:4d} | WIT loss {report['lm loss']:.4f} over N={report['lm loss tokens']} | "
                f"prompt NLL {report['prompt nll']:.4f} | response NLL {report['response nll']:.4f} | "
                f"grad norm {report['grad norm']:.3f} | lr {report['lr']:.2e} | {time.perf_counter() - start:.2f}s",
                flush=True,
            )

    if args.save:
        from wit_megatron.convert.checkpoint import ASSETS, resolve, save_training_checkpoint

        assets = resolve(args.load)[0] / ASSETS
        directory = save_training_checkpoint(model, args.save, args.train_iters, record, assets if assets.exists() else None)
        if torch.distributed.get_rank() == 0:
            print(f"saved {directory}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def make_global_batches(args, arch: GPTArch, weights: RoleWeights, reads_data: bool):
    """step -> the global batch of that step ({key: [global_batch_size, seq_length]})."""
    if not args.data_path:
        from wit_megatron.testing.synthetic import synthetic_batch

        # The synthetic task repeats one fixed global batch, so the loss must fall.
        return lambda step: synthetic_batch(args.global_batch_size, args.seq_length, arch.vocab_size, weights, seed=0)

    from wit_megatron.data.dataset import WITDatasetConfig, build_datasets

    paths = args.data_path
    blend = ([paths[0]], None) if len(paths) == 1 else (paths[1::2], [float(w) for w in paths[0::2]])
    config = WITDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, split=args.split,
        role_weights=weights, packing=not args.no_packing,
    )
    # Built where the data is read (TP rank 0); Megatron's builder caches its indices next to the data.
    train, _, _ = build_datasets(config, [args.train_iters * args.global_batch_size, None, None], is_built_on_rank=lambda: reads_data)
    if not reads_data:
        return lambda step: None
    size = args.global_batch_size
    return lambda step: torch.utils.data.default_collate([train[i] for i in range(step * size, (step + 1) * size)])


if __name__ == "__main__":
    main()
