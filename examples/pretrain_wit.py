"""WIT fine-tuning with Megatron-Core, top to bottom.

    torchrun --nproc-per-node 4 examples/pretrain_wit.py --tp 2 --pp 2 --lambda-prompt 0.2 --lambda-response 0.8

On a machine without GPUs it runs over gloo with the CPU layer (tiny model, synthetic instruction
batches); on GPUs it takes the normal NCCL / Transformer Engine path.
Loss = Σ w·NLL / N over the global batch, w = λ_p on prompt tokens and λ_r on response tokens,
N = the number of targets with w ≠ 0.
"""

import argparse
import itertools
import time

import torch

from wit_megatron.model import GPTArch, build_model, check_layout, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_distributed, init_model_parallel
from wit_megatron.testing.synthetic import micro_batches, synthetic_batch
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
    g = p.add_argument_group("model (the tiny demo model)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--num-query-groups", type=int, default=4)
    g.add_argument("--vocab-size", type=int, default=256)
    return p.parse_args()


def main():
    args = parse_args()
    weights = RoleWeights(args.lambda_prompt, args.lambda_response)
    init_distributed()
    layout = ParallelLayout(args.tp, args.pp, args.vpp)
    arch = GPTArch(
        vocab_size=args.vocab_size, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        ffn_hidden_size=4 * args.hidden_size, max_position_embeddings=args.seq_length,
    )
    check_layout(arch, layout)
    init_model_parallel(layout, seed=args.seed)

    from megatron.core import parallel_state as ps

    # Model: one GPTModel chunk per virtual pipeline stage, wrapped in Megatron-Core DDP.
    config = transformer_config(arch, layout)
    model = wrap_ddp(build_model(arch, config), config)
    optimizer, scheduler = build_optimizer(
        model, args.lr, args.weight_decay, args.clip_grad, args.train_iters, args.warmup_iters
    )

    # Data: each data-parallel rank takes its slice of every global batch, in micro-batches.
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = args.global_batch_size // dp_size
    num_microbatches = per_rank // args.micro_batch_size
    if per_rank * dp_size != args.global_batch_size or num_microbatches * args.micro_batch_size != per_rank:
        raise SystemExit(
            f"global batch {args.global_batch_size} must be a multiple of data-parallel size {dp_size} "
            f"x micro-batch size {args.micro_batch_size}"
        )

    def rank_micro_batches(step: int):
        batch = synthetic_batch(args.global_batch_size, args.seq_length, arch.vocab_size, weights, seed=step)
        return micro_batches(batch, dp_rank * per_rank, (dp_rank + 1) * per_rank, args.micro_batch_size)

    reads_data = ps.get_tensor_model_parallel_rank() == 0
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    logs_here = last_stage and dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0

    # Training loop. The synthetic task repeats one fixed global batch, so the loss must fall.
    for step in range(1, args.train_iters + 1):
        start = time.perf_counter()
        iterators = [rank_micro_batches(0) if reads_data else None for _ in model]
        report = train_step(model, optimizer, scheduler, iterators, num_microbatches, args.micro_batch_size, args.seq_length)
        if logs_here:
            print(
                f"step {step:4d} | WIT loss {report['lm loss']:.4f} over N={report['lm loss tokens']} | "
                f"prompt NLL {report['prompt nll']:.4f} | response NLL {report['response nll']:.4f} | "
                f"grad norm {report['grad norm']:.3f} | lr {report['lr']:.2e} | {time.perf_counter() - start:.2f}s",
                flush=True,
            )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
