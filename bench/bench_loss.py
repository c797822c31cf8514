"""Step time and peak memory of the WIT loss against Megatron's own masked cross entropy.

    python bench/bench_loss.py [--tp 2] [--iters 20]

Both variants run the same model, layout and batches through the same schedule; they differ only in
the loss function and in the per-token tensors the batch carries (WIT adds float loss_weights and
response_mask). Step times alternate between the variants inside one process group (so drift hits
both alike); peak memory is measured in a separate run per variant (CUDA: max_memory_allocated;
CPU: peak RSS growth over the RSS after the model is built). Goal: ratios at most 1.01.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def megatron_masked_ce_forward_step(data_iterator, model):
    """Megatron-LM pretrain_gpt's per-token loss: Σ loss·mask and the mask's token count. Where the batch
    carries roles (WIT data), the mask is the one an SFT dataset gives Megatron-LM: response targets only
    (conventional instruction tuning, the same number as WIT's loss at λ = (0, 1))."""
    from wit_megatron.batch import get_batch
    from wit_megatron.model import unwrap

    batch = get_batch(data_iterator, vp_stage=unwrap(model).vp_stage)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        mask = batch["loss_mask"] if batch.get("response_mask") is None else batch["loss_mask"] * batch["response_mask"]
        mask = mask.view(-1).float()
        loss = torch.sum(output_tensor.view(-1).float() * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}

    return output, loss_func


def measure(mode: str, iters: int, seq_length: int, micro_batch_size: int, num_microbatches: int, tp: int) -> dict:
    import psutil
    from megatron.core import parallel_state as ps

    from wit_megatron.model import GPTArch, build_model, transformer_config
    from wit_megatron.roles import RoleWeights
    from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
    from wit_megatron.testing.synthetic import micro_batches, synthetic_batch
    from wit_megatron.training.step import forward_backward, forward_step, wrap_ddp

    layout = ParallelLayout(tp=tp)
    init_model_parallel(layout)
    arch = GPTArch(vocab_size=32000, num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=1024, max_position_embeddings=seq_length)
    config = transformer_config(arch, layout)
    model = wrap_ddp(build_model(arch, config), config)
    n = micro_batch_size * num_microbatches
    wit_batch = synthetic_batch(n, seq_length, arch.vocab_size, RoleWeights(0.2, 0.8), seed=0)
    plain_batch = {k: wit_batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    variants = {
        "megatron": (megatron_masked_ce_forward_step, plain_batch),
        "wit": (forward_step, wit_batch),
    }
    reads = ps.get_tensor_model_parallel_rank() == 0

    def step(name):
        func, batch = variants[name]
        iterator = micro_batches(batch, 0, n, micro_batch_size) if reads else None
        start = time.perf_counter()
        forward_backward(model, [iterator], num_microbatches, micro_batch_size, seq_length, forward_step_func=func)
        return time.perf_counter() - start

    if mode == "time":
        times = {"megatron": [], "wit": []}
        for name in ("megatron", "wit"):
            step(name)  # warm-up
        for i in range(iters):
            order = ("megatron", "wit") if i % 2 == 0 else ("wit", "megatron")
            for name in order:
                times[name].append(step(name))
        return {name: statistics.median(t) for name, t in times.items()}

    # mode "memory:<variant>": this process runs one variant only.
    name = mode.split(":")[1]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            step(name)
        return {name: torch.cuda.max_memory_allocated()}
    rss_before = psutil.Process().memory_info().rss
    for _ in range(iters):
        step(name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {name: peak - rss_before}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=2)
    args = p.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    sys.path.insert(0, str(ROOT))
    from wit_megatron.runtime.launch import run_distributed

    kwargs = dict(iters=args.iters, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                  num_microbatches=args.num_microbatches, tp=args.tp)
    times = run_distributed("bench.bench_loss:measure", args.tp, mode="time", **kwargs)[0]
    memory = {}
    for name in ("megatron", "wit"):
        memory.update(run_distributed("bench.bench_loss:measure", args.tp, mode=f"memory:{name}", **dict(kwargs, iters=3))[0])

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"WIT loss vs Megatron masked CE | tp{args.tp} | {device} | seq {args.seq_length} | "
          f"micro-batch {args.micro_batch_size} x {args.num_microbatches} | vocab 32000 | {args.iters} steps each")
    print(f"| metric | Megatron masked CE | WIT | ratio (goal <= 1.01) |")
    print(f"|---|---|---|---|")
    print(f"| step time (median, s) | {times['megatron']:.4f} | {times['wit']:.4f} | {times['wit'] / times['megatron']:.3f} |")
    unit = "peak allocated (MiB)" if device == "cuda" else "peak RSS growth (MiB)"
    print(f"| {unit} | {memory['megatron'] / 2**20:.1f} | {memory['wit'] / 2**20:.1f} | {memory['wit'] / memory['megatron']:.3f} |")


if __name__ == "__main__":
    main()
