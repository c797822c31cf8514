"""WIT fine-tuning with Megatron-Core.

    torchrun --nproc-per-node 8 examples/pretrain_wit.py --tp 4 --pp 2 \\
        --load CKPT --data-path DATA_PREFIX --lambda-prompt 0.2 --lambda-response 0.8 \\
        --save RUN --save-interval 500 --eval-interval 500 --split 98,2,0 --tensorboard-dir RUN/tb

Loss = Σ w·NLL / N over the global batch, w = λ_p on prompt tokens and λ_r on response tokens,
N = the number of targets with w ≠ 0. Options are Megatron-LM's (`--help` lists them with the WIT
paper's defaults). `--load` takes a checkpoint written by `wit-convert-hf-to-megatron` (a fresh start) or
saved by this script (a resume: weights, optimizer, scheduler, RNG and data position); `--data-path`
takes prefixes written by `wit-preprocess-data`. Without them a tiny random model learns a synthetic
task (the plumbing demo). On a machine without GPUs everything runs over gloo with the CPU layer; on
GPUs it takes the normal NCCL / Transformer Engine path.

The run itself is `wit_megatron.training.loop.pretrain`: set-up, the loop, validation, checkpoints.
"""

import sys

import torch

from wit_megatron.checkpoint import CheckpointError
from wit_megatron.runtime.kernels import quiet_fallback_warnings
from wit_megatron.training.arguments import parse_args
from wit_megatron.training.loop import RunError, pretrain


def main() -> int:
    quiet_fallback_warnings()  # megatron-core's "not installed" notes; the log says which kernels run instead
    args = parse_args()  # every check that needs no process group; exit 2 with a message on bad options
    try:
        result = pretrain(args)
    except (CheckpointError, RunError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    torch.distributed.destroy_process_group()
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
