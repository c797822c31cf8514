"""Megatron-LM's pretrain_gpt.py, training with WIT: what a user's own copy becomes.

    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_gpt_wit.py \\
        $(cat CKPT/megatron_lm_flags.txt) --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 \\
        --load CKPT --finetune --save RUN --save-interval 500 \\
        --data-path DATA_PREFIX --split 98,2,0 --seq-length 4096 \\
        --tokenizer-type NullTokenizer --vocab-size VOCAB \\
        --calculate-per-token-loss --lambda-prompt 0.2 --lambda-response 0.8 \\
        --micro-batch-size 1 --global-batch-size 64 --train-iters 1000 --lr 2e-5 --lr-decay-style cosine ...

Megatron-LM's own script, option for option, with three things of WIT's (docs/megatron_lm.md lists the
changed lines): the WIT options (`add_wit_args`, λ per role, the output layer), WIT's dataset provider
(WITDataset from the --data-path that wit-preprocess-data wrote) and WIT's forward step (the loss in the
per-token form, `--calculate-per-token-loss` required; `--wit-loss-impl chunked` for the lean output
layer of docs/output-loss.md). The model is built as pretrain_gpt.py builds GPT, from
Megatron-LM's arguments (the converter's megatron_lm_flags.txt). `carry_record` puts the converter's
record into --save so the run's saves convert back with wit-convert-megatron-to-hf.

Written for Megatron-LM 0.19's layout (`parse_and_validate_args`, then the config-container `pretrain()`),
as the `megatron.training` in megatron-core 0.19's wheel or a Megatron-LM 0.19 source tree on PYTHONPATH
has it; tested with megatron-core 0.19.2 (docs/megatron_lm.md has the older layout's lines).
"""

import sys

from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

from wit_megatron.integrations.megatron_lm import add_wit_args, carry_record, forward_step, train_valid_test_datasets_provider
from wit_megatron.runtime import compat, cpu


def main() -> int:
    # Not part of a user's change (docs/megatron_lm.md): megatron-core's wheel ships its dataset helpers
    # prebuilt (no Makefile to build them with); synchronous saves hand their write results over in
    # process; without GPUs the CPU layer runs Megatron-LM over gloo (it does nothing on GPUs).
    compat.use_prebuilt_dataset_helpers()
    compat.megatron_lm_saves_results_in_process()
    cpu.enable_megatron_lm()

    args = parse_and_validate_args(extra_args_provider=add_wit_args,  # WIT: λ options and their checks
                                   args_defaults={"tokenizer_type": "NullTokenizer"})  # WIT data is pre-tokenized
    carry_record(args)  # WIT: the converter's record into --save, for wit-convert-megatron-to-hf
    pretrain(
        pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
        train_valid_test_datasets_provider,  # WIT: WITDataset
        ModelType.encoder_or_decoder,
        forward_step,  # WIT: the per-token WIT loss
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
