"""The training entry point's costs, as ratios against same-machine yardsticks measured in the same run:

1. step time of a training iteration through `pretrain` (examples/pretrain_wit.py's run) with the WIT loss
   against the same run with Megatron-LM's plain masked loss (`bench_loss.megatron_masked_ce_forward_step`),
   both on λ = (0, 1) data, where the two losses are the same number (printed too). Goal: <= 1.01.
2. a training save (model, optimizer, scheduler, RNG, train state: megatron-core's torch_dist, synced and
   renamed into place) and its load, against `torch.save` / `torch.load` of the same model and optimizer
   state dicts to one file (synced too).

    python bench/bench_train.py [--tp 1] [--iters 12] [--rounds 3]

The two variants of 1 alternate over rounds (ABAB...) inside one process group, so drift hits both;
each round's figure is the median iteration time of iterations 2..N from the run's own log.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--num-query-groups", "4",
         "--vocab-size", "32000"]


def measure(iters: int, rounds: int, seq_length: int, global_batch_size: int, micro_batch_size: int) -> dict:
    from bench.bench_loss import megatron_masked_ce_forward_step
    from wit_megatron import checkpoint
    from wit_megatron.model import unwrap
    from wit_megatron.training.arguments import parse_args
    from wit_megatron.training.loop import pretrain
    from wit_megatron.training.step import forward_step

    argv = MODEL + ["--seq-length", str(seq_length), "--global-batch-size", str(global_batch_size), "--micro-batch-size",
                    str(micro_batch_size), "--train-iters", str(iters), "--lambda-prompt", "0", "--lambda-response", "1",
                    "--lr", "1e-4", "--log-interval", "1", "--tp", os.environ["WORLD_SIZE"]]
    variants = {"megatron": megatron_masked_ce_forward_step, "wit": forward_step}
    times = {name: [] for name in variants}
    losses = {}
    for r in range(rounds):
        for name in (("megatron", "wit") if r % 2 == 0 else ("wit", "megatron")):
            result = pretrain(parse_args(argv), forward_step_func=variants[name])
            times[name].append(statistics.median(line["iteration-time"] for line in result.train_log[1:]))
            losses[name] = [line["lm loss"] for line in result.train_log]

    # A training save and its load, against torch.save / torch.load of the same state.
    args = parse_args(argv + ["--train-iters", "2"])
    result = pretrain(args)
    state = {"model": [unwrap(c).state_dict() for c in result.model], "optimizer": result.optimizer.state_dict()}
    record = checkpoint.make_record("tiny-random", args.arch, args.params_dtype, None)
    save_times, load_times, plain_save, plain_load = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpt"
        for i in range(3):
            start = time.perf_counter()
            directory = checkpoint.save(result.model, root, 2 + i, record, optimizer=result.optimizer,
                                        scheduler=result.scheduler,
                                        train_state={"iteration": 2 + i, "consumed_train_samples": 0, "data": {}})
            save_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.load_training_state(result.model, checkpoint.open_checkpoint(root), result.optimizer, result.scheduler)
            load_times.append(time.perf_counter() - start)
            path = Path(tmp) / f"plain{torch.distributed.get_rank()}.pt"
            torch.distributed.barrier()
            start = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            torch.distributed.barrier()
            plain_save.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(path, weights_only=False)
            torch.distributed.barrier()
            plain_load.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in directory.iterdir())
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "losses": losses,
            "save": statistics.median(save_times), "load": statistics.median(load_times),
            "plain_save": statistics.median(plain_save), "plain_load": statistics.median(plain_load), "bytes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    args = p.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    sys.path.insert(0, str(ROOT))
    from wit_megatron.runtime.launch import run_distributed

    r = run_distributed("bench.bench_train:measure", args.tp, iters=args.iters, rounds=args.rounds,
                        seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                        micro_batch_size=args.micro_batch_size)[-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = r["times"]
    wit, megatron = r["losses"]["wit"], r["losses"]["megatron"]
    rel = [abs(a - b) / abs(b) for a, b in zip(wit, megatron)]
    print(f"training entry point | tp{args.tp} | {device} | 4 layers, hidden 512, vocab 32000 | seq {args.seq_length} | "
          f"global batch {args.global_batch_size} | {args.iters} iterations x {args.rounds} rounds per variant")
    print(f"λ = (0, 1), where both losses are the same number: relative difference at iteration 1 (the same weights) "
          f"{rel[0]:.1e}, at most {max(rel):.1e} over the {len(rel)} iterations")
    print("| metric | yardstick | wit-megatron | ratio |")
    print("|---|---|---|---|")
    print(f"| iteration time (s), vs Megatron-LM's masked loss (goal <= 1.01) | {t['megatron']:.4f} | {t['wit']:.4f} | "
          f"{t['wit'] / t['megatron']:.3f} |")
    print(f"| training save (s, {r['bytes'] / 2**20:.0f} MiB), vs torch.save of the same state | {r['plain_save']:.3f} | "
          f"{r['save']:.3f} | {r['save'] / r['plain_save']:.2f} |")
    print(f"| training load (s), vs torch.load | {r['plain_load']:.3f} | {r['load']:.3f} | {r['load'] / r['plain_load']:.2f} |")


if __name__ == "__main__":
    main()
