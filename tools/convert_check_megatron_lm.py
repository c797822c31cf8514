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
0.16.1's); this is how tests/test_convert_megatron_lm.py runs it. Architecture flags come after CKPT
(or `--use-checkpoint-args`).

The model is built the way that Megatron-LM's pretrain_gpt.py builds it (`pretrain_gpt_model`): from
0.19 through its config container (`gpt_config_from_args` and the config's builder, in the wheel);
before, with `partial(model_provider, gpt_builder)` from the source tree, which `local_model_provider`
mirrors for `installed` (0.17 and 0.18 wheels hold no gpt_builders.py). None of them passes
`--rope-scaling-factor` to GPTModel (core_v0.16.1 to core_v0.19.0, and main in 2026-12), which then
keeps its default 8.0: a model with another factor (Llama-3.2: 32) loads with the wrong RoPE. When the
arguments ask for such a factor, a second line gives the logits of the same build with the factor
passed (the one argument Megatron-LM's builder lacks), which tells a wrong checkpoint or flags file
apart from that Megatron-LM defect. The exit status is the first line's (Megatron-LM as it is).

Megatron-LM runs on CPU through this project's CPU layer (`cpu.enable_megatron_lm`: its model-parallel
groups and RNG seeds, which it sets up only where it sees a CUDA device); the C++ dataset helpers it
compiles at start-up are not needed to load weights and are not built here.
"""

import os
import sys
from functools import partial

import megatron.core  # noqa: F401  (the installed megatron-core, imported before Megatron-LM's tree is on the path)
import torch

from wit_megatron.megatron_lm_args import GPT_MODEL_ROPE_SCALING_FACTOR
from wit_megatron.runtime import cpu

FIXED_ARGS = ["--finetune", "--ckpt-format", "torch_dist", "--use-cpu-initialization", "--no-load-optim",
              "--no-load-rng", "--distributed-backend", "gloo", "--transformer-impl", "local", "--micro-batch-size", "1",
              "--tokenizer-type", "NullTokenizer", "--make-vocab-size-divisible-by", "1", "--no-masked-softmax-fusion",
              "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
              "--no-persist-layer-norm", "--attention-dropout", "0", "--hidden-dropout", "0"]
SEQ = 64  # long enough for RoPE scaling to show: factor 8 vs 32 moves the test model's logits by 1.3e-3 here, 1.6e-4 at 12
TOLERANCE = 1e-4


def initialize(extra: list[str], ckpt: str) -> None:
    import megatron.training.initialize as init
    from megatron.training import arguments

    sys.argv = ["pretrain_gpt.py", "--load", ckpt, "--seq-length", str(SEQ), *FIXED_ARGS, *extra]
    cpu.enable_megatron_lm()
    init._compile_dependencies = lambda: None
    if hasattr(arguments, "parse_and_validate_args"):  # Megatron-LM 0.19: pretrain_gpt.py parses first
        arguments.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    init.initialize_megatron(allow_no_cuda=True)


def local_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None,
                         rope_scaling_factor=None):
    """Megatron-LM's `partial(model_provider, gpt_builder)` on its path for a dense model with
    `--transformer-impl local` and no `--spec`: the config from the arguments, the local layer spec.
    Like gpt_builder it passes no rope_scaling_factor, unless given one."""
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
        **({} if rope_scaling_factor is None else {"rope_scaling_factor": rope_scaling_factor}),
    )


def pretrain_gpt_model(mlm: str, pass_rope_scaling_factor: bool = False) -> list:
    """The model chunks as pretrain_gpt.py of that Megatron-LM builds them (unwrapped; see the module
    docstring); with `pass_rope_scaling_factor`, GPTModel also gets `--rope-scaling-factor`."""
    import importlib.util

    from megatron.training import get_args
    from megatron.training.training import get_model

    args = get_args()
    if importlib.util.find_spec("megatron.training.argument_utils") is not None:
        from megatron.training import argument_utils

        if hasattr(argument_utils, "gpt_config_from_args"):  # Megatron-LM 0.19+
            from megatron.core.process_groups_config import ProcessGroupCollection

            config = argument_utils.gpt_config_from_args(args)
            if pass_rope_scaling_factor:
                config.rope_scaling_factor = args.rope_scaling_factor
            builder = config.get_builder_cls()(config)
            return builder.build_distributed_models(pg_collection=ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False)
    if pass_rope_scaling_factor:
        provider = partial(local_model_provider, rope_scaling_factor=args.rope_scaling_factor)
    elif mlm == "installed":
        provider = local_model_provider
    else:
        from gpt_builders import gpt_builder
        from model_provider import model_provider

        provider = partial(model_provider, gpt_builder)
    return get_model(provider, wrap_with_ddp=False)


def logits_against_hf(model, hf: str) -> tuple[float, float]:
    """(max |logit - HF logit|, top-1 agreement) on two seeded sequences of SEQ tokens."""
    from wit_megatron.convert.verify import hf_logits

    reference_vocab = hf_logits(hf, torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    tokens = torch.randint(0, reference_vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))
    model[0].eval()
    with torch.no_grad():
        logits = model[0](tokens, torch.arange(SEQ).unsqueeze(0).expand(2, SEQ), None).float()
    reference = hf_logits(hf, tokens)
    top1 = (logits[..., :reference_vocab].argmax(-1) == reference.argmax(-1)).float().mean().item()
    return (logits[..., :reference_vocab] - reference).abs().max().item(), top1


def main() -> None:
    mlm, hf, ckpt, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    if mlm != "installed":
        sys.path.insert(0, mlm)
    if os.environ.get("MLM_DEPS"):
        sys.path.append(os.environ["MLM_DEPS"])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    initialize(extra, ckpt)

    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint

    model = pretrain_gpt_model(mlm)
    iteration, _ = load_checkpoint(model, None, None)
    diff, top1 = logits_against_hf(model, hf)
    args = get_args()
    print(f"Megatron-LM load_checkpoint: iteration {iteration}, padded vocab {args.padded_vocab_size}, "
          f"max |logit - HF logit| {diff:.3e}, top-1 agreement {top1:.3f}")
    print(f"Megatron-LM arguments: use_rope_scaling {args.use_rope_scaling}, rope_scaling_factor {args.rope_scaling_factor}")
    if args.use_rope_scaling and args.rope_scaling_factor != GPT_MODEL_ROPE_SCALING_FACTOR:
        fixed = pretrain_gpt_model(mlm, pass_rope_scaling_factor=True)
        load_checkpoint(fixed, None, None)
        fixed_diff, fixed_top1 = logits_against_hf(fixed, hf)
        print(f"Megatron-LM's build with rope_scaling_factor {args.rope_scaling_factor} passed to GPTModel (pretrain_gpt.py "
              f"passes none: GPTModel keeps {GPT_MODEL_ROPE_SCALING_FACTOR}): max |logit - HF logit| {fixed_diff:.3e}, "
              f"top-1 agreement {fixed_top1:.3f}")
    if args.save:
        save_checkpoint(1, model, None, None, num_floating_point_operations_so_far=0)
        print(f"Megatron-LM save_checkpoint: {args.save}")
    sys.exit(0 if diff <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
