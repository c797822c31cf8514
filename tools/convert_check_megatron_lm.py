"""Manual check (not run in CI): load a checkpoint written by wit-convert-hf-to-megatron through
Megatron-LM's own `load_checkpoint` (`--load CKPT --finetune --ckpt-format torch_dist`) on CPU, one
gloo rank, and compare its logits with the Hugging Face model's. docs/convert.md records the runs.

    python tools/convert_check_megatron_lm.py MEGATRON_LM_DIR HF_DIR CKPT [Megatron-LM arguments ...]

MEGATRON_LM_DIR: a Megatron-LM source tree matching the installed megatron-core (its
`megatron/training`, `model_provider.py` and `gpt_builders.py` are used; megatron-core stays the
installed one). Megatron-LM also imports `six` and `triton`: a directory holding them can be given
in MLM_DEPS. Architecture flags come after CKPT (or `--use-checkpoint-args`).

What Megatron-LM needs on CPU besides this project's CPU layer, each patched here and nowhere else:
its model-parallel groups and model-parallel RNG seed are set up only `if torch.cuda.device_count()
> 0` (training/initialize.py), and it compiles the C++ dataset helpers (not needed to load weights).
"""

import os
import sys
from functools import partial

import megatron.core  # noqa: F401  (the installed megatron-core, imported before Megatron-LM's tree is on the path)
import torch

from wit_megatron.runtime import cpu

FIXED_ARGS = ["--finetune", "--ckpt-format", "torch_dist", "--use-cpu-initialization", "--no-load-optim",
              "--no-load-rng", "--distributed-backend", "gloo", "--transformer-impl", "local", "--micro-batch-size", "1",
              "--tokenizer-type", "NullTokenizer", "--make-vocab-size-divisible-by", "1", "--no-masked-softmax-fusion",
              "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
              "--no-persist-layer-norm", "--attention-dropout", "0", "--hidden-dropout", "0"]
SEQ = 12


def initialize(extra: list[str], ckpt: str) -> None:
    import megatron.training.initialize as init
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.training import arguments, get_args

    sys.argv = ["pretrain_gpt.py", "--load", ckpt, "--seq-length", str(SEQ), *FIXED_ARGS, *extra]
    original = init._initialize_distributed

    def initialize_distributed(*args, **kwargs):
        original(*args, **kwargs)
        if not mpu.model_parallel_is_initialized():  # skipped by Megatron-LM without CUDA devices
            a = get_args()
            mpu.initialize_model_parallel(a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                                          a.virtual_pipeline_model_parallel_size)

    init._initialize_distributed = initialize_distributed
    init._compile_dependencies = lambda: None
    if hasattr(arguments, "parse_and_validate_args"):  # Megatron-LM 0.19: pretrain_gpt.py parses first
        arguments.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    init.initialize_megatron(allow_no_cuda=True)
    tensor_parallel.model_parallel_cuda_manual_seed(get_args().seed)  # also skipped without CUDA devices


def main() -> None:
    mlm, hf, ckpt, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    sys.path.insert(0, mlm)
    if os.environ.get("MLM_DEPS"):
        sys.path.append(os.environ["MLM_DEPS"])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    cpu.enable()
    initialize(extra, ckpt)

    from gpt_builders import gpt_builder
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.training import get_model
    from model_provider import model_provider

    from wit_megatron.convert.verify import hf_logits

    model = get_model(partial(model_provider, gpt_builder), wrap_with_ddp=False)
    iteration, _ = load_checkpoint(model, None, None)
    reference_vocab = hf_logits(hf, torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    tokens = torch.randint(0, reference_vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))
    model[0].eval()
    with torch.no_grad():
        logits = model[0](tokens, torch.arange(SEQ).unsqueeze(0).expand(2, SEQ), None).float()
    reference = hf_logits(hf, tokens)
    diff = (logits[..., :reference_vocab] - reference).abs().max().item()
    print(f"Megatron-LM load_checkpoint: iteration {iteration}, padded vocab {get_args().padded_vocab_size}, "
          f"max |logit - HF logit| {diff:.3e}, top-1 agreement "
          f"{(logits.argmax(-1) == reference.argmax(-1)).float().mean().item():.3f}")


if __name__ == "__main__":
    main()
