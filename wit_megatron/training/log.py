"""Training and validation logs in Megatron-LM's format, and the same scalars to TensorBoard and W&B.

One line every `--log-interval` iterations, printed by the last rank (a rank of the last pipeline
stage, which holds the loss), e.g.

     iteration        1/      20 | consumed samples:            8 | elapsed time per iteration (ms): 812.4 |
     learning rate: 0.000000E+00 | global batch size:     8 | lm loss: 5.999380E+00 | prompt nll: ... |
     response nll: ... | loss scale: 1.0 | grad norm: 1.234 | tokens per second: 1260.3 |
     number of skipped iterations:   0 | number of nan iterations:   0 | prompt tokens: 180 |
     response tokens: 301 | N: 481 |

(one line in the log). The losses are exact over the interval's iterations, micro-batches and ranks:
Σ sums / Σ counts, never a mean of means. `lm loss` is the WIT loss Σ w·NLL / N; `prompt nll` and
`response nll` are the plain mean NLL of prompt and response targets (comparable across λ); `N` counts
the targets with non-zero weight. Validation:

     validation loss at iteration 100 | lm loss value: ... | prompt nll value: ... | response nll value: ... |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from wit_megatron.loss import REPORT_KEYS


@dataclass
class Interval:
    """What one log line covers: sums and counts over its iterations."""

    iterations: int = 0
    skipped: int = 0
    nan: int = 0
    seconds: float = 0.0
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, report: dict, seconds: float) -> None:
        self.iterations += 1
        self.seconds += seconds
        self.skipped += int(report.get("skipped", False))
        for key in REPORT_KEYS:
            if key + " sum" in report:
                self.sums[key] = self.sums.get(key, 0.0) + report[key + " sum"]
                self.counts[key] = self.counts.get(key, 0) + report[key + " tokens"]
        self.nan += int(not math.isfinite(report.get("lm loss sum", 0.0)))

    def mean(self, key: str) -> Optional[float]:
        if key not in self.counts:
            return None
        return self.sums[key] / self.counts[key] if self.counts[key] else 0.0


class Logger:
    """Prints on the last rank and writes TensorBoard / W&B scalars there (Megatron-LM's convention)."""

    def __init__(self, args):
        self.args = args
        self.is_last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.tensorboard = self.wandb = None
        if self.is_last_rank and args.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(args.tensorboard_dir), max_queue=1000)
        if self.is_last_rank and args.wandb_project is not None:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=args.wandb_save_dir,
                                    config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    def print(self, text: str) -> None:
        if self.is_last_rank:
            print(text, flush=True)

    def scalars(self, values: dict, iteration: int, consumed_samples: int) -> None:
        for key, value in values.items():
            if value is None:
                continue
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(key, value, iteration)
                self.tensorboard.add_scalar(f"{key} vs samples", value, consumed_samples)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=iteration)

    def training(self, interval: Interval, iteration: int, train_iters: int, consumed_samples: int, lr: float,
                 loss_scale: float, grad_norm: Optional[float]) -> dict:
        """The log line of the iterations in `interval` (ending at `iteration`); returns its values."""
        args = self.args
        ms = 1000.0 * interval.seconds / max(1, interval.iterations)
        tokens_per_second = args.global_batch_size * args.seq_length * interval.iterations / max(interval.seconds, 1e-9)
        losses = {key: interval.mean(key) for key in REPORT_KEYS}
        line = f" iteration {iteration:8d}/{train_iters:8d} |"
        line += f" consumed samples: {consumed_samples:12d} |"
        line += f" elapsed time per iteration (ms): {ms:.1f} |"
        line += f" learning rate: {lr:.6E} |"
        line += f" global batch size: {args.global_batch_size:5d} |"
        for key, value in losses.items():
            if value is not None:
                line += f" {key}: {value:.6E} |"
        line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        line += f" tokens per second: {tokens_per_second:.1f} |"
        line += f" number of skipped iterations: {interval.skipped:3d} |"
        line += f" number of nan iterations: {interval.nan:3d} |"
        counts = {"prompt tokens": interval.counts.get("prompt nll"), "response tokens": interval.counts.get("response nll"),
                  "N": interval.counts.get("lm loss")}
        for key, value in counts.items():
            if value is not None:
                line += f" {key}: {value} |"
        self.print(line)
        values = {**losses, "learning-rate": lr, "loss-scale": loss_scale, "grad-norm": grad_norm,
                  "batch-size": args.global_batch_size, "iteration-time": ms / 1000.0, "tokens-per-second": tokens_per_second,
                  "prompt tokens": counts["prompt tokens"], "response tokens": counts["response tokens"],
                  "lm loss tokens": counts["N"], "skipped iterations": interval.skipped, "nan iterations": interval.nan}
        self.scalars(values, iteration, consumed_samples)
        return values

    def validation(self, interval: Interval, iteration: int, consumed_samples: int) -> dict:
        losses = {key: interval.mean(key) for key in REPORT_KEYS}
        line = f" validation loss at iteration {iteration} |"
        for key, value in losses.items():
            if value is not None:
                line += f" {key} value: {value:.6E} |"
        line += f" samples: {interval.iterations * self.args.global_batch_size} |"
        for key, name in (("prompt nll", "prompt tokens"), ("response nll", "response tokens"), ("lm loss", "N")):
            if key in interval.counts:
                line += f" {name}: {interval.counts[key]} |"
        length = len(line) + 1
        self.print("-" * length + "\n" + line + "\n" + "-" * length)
        self.scalars({f"{key} validation": value for key, value in losses.items()}, iteration, consumed_samples)
        return losses

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
