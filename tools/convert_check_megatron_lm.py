"""Load a checkpoint written by wit-convert-hf-to-megatron through Megatron-LM's own `load_checkpoint`
(`--load CKPT --finetune --ckpt-format torch_dist`) on CPU, one gloo rank, and compare its logits with
the Hugging Face model's; exit status 1 beyond 1e-4. docs/convert.md records the runs.

    python tools/convert_check_megatron_lm.py MEGATRON_LM_DIR|installed HF_DIR CKPT [Megatron-LM arguments ...]

With `--save DIR --save-interval 1 --no-save-optim` among the Megatron-LM arguments, the loaded model is
then saved by Megatron-LM's own `save_checkpoint` (iteration 1: `args`, RNG and rerun state as
Megatron-LM writes them), which tests/test_convert_megatron_lm.py holds to this project's checks for
untrusted checkpoints (wit_megatron/safe_pickle.py).

MEGATRON_LM_DIR: a Megatron-LM source tree matching the installed megatron-core (its
`megatron/training`, `model_provider.py` and `gpt_builders.py` are used; megatron-core stays the
installed one). Megatron-LM also imports `six` and `triton`: a directory holding them can be given
in MLM_DEPS. `installed`: the `megatron.training` that megatron-core's wheel ships from 0.17 on (not
0.16.1's), with the model built as Megatron-LM's `gpt_builder` builds it for `--transformer-impl
local` (`local_model_provider` below: that tree's builder files are not in the wheel); this is how
tests/test_convert_megatron_lm.py runs it. Architecture flags come after CKPT (or `--use-checkpoint-args`).

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
TOLERANCE = 1e-4


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


def local_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's `partial(model_provider, gpt_builder)` on its path for a dense model with
    `--transformer-impl local` and no `--spec`: the config from the arguments, the local layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                    normalization=config.normalization)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage, pg_collection=pg_collection,
    )


def main() -> None:
    mlm, hf, ckpt, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    if mlm != "installed":
        sys.path.insert(0, mlm)
    if os.environ.get("MLM_DEPS"):
        sys.path.append(os.environ["MLM_DEPS"])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    cpu.enable()
    initialize(extra, ckpt)

    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint
    from megatron.training.training import get_model

    from wit_megatron.convert.verify import hf_logits

    if mlm == "installed":
        provider = local_model_provider
    else:
        from gpt_builders import gpt_builder
        from model_provider import model_provider

        provider = partial(model_provider, gpt_builder)
    model = get_model(provider, wrap_with_ddp=False)
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
    if get_args().save:
        save_checkpoint(1, model, None, None, num_floating_point_operations_so_far=0)
        print(f"Megatron-LM save_checkpoint: {get_args().save}")
    sys.exit(0 if diff <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
