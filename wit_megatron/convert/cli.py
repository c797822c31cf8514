"""Argument parsing for the conversion tools (tools/*.py and the wit-* console scripts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wit_megatron import interrupt
from wit_megatron.argtypes import non_negative_float, positive_float, positive_int
from wit_megatron.checkpoint import CheckpointError
from wit_megatron.model import LayoutError
from wit_megatron.output import OutputError
from wit_megatron.runtime.kernels import quiet_fallback_warnings


def _run(fn, out: Path = None) -> int:
    """fn() as a tool runs: a refused input prints its message and exits 2 (not a traceback); SIGTERM
    and SIGINT stop the writer processes, remove the staging of `out` and exit 128 + the signal."""
    quiet_fallback_warnings()
    interrupt.die_with_parent()
    try:
        with interrupt.stop_on_signals(None if out is None else str(out)):
            fn()
    except (CheckpointError, LayoutError, OutputError) as e:  # ConversionError is a CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def hf_to_megatron(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Hugging Face model directory -> Megatron-Core torch_dist checkpoint "
                                     "(Megatron-LM layout, loads at any TP/PP/VPP layout).")
    parser.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory (refused if it exists)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast weights (default: keep the file's dtype)")
    parser.add_argument("--layer-spec", choices=["te", "local"], default="te",
                        help="layer spec examples/pretrain_wit.py builds from this checkpoint (recorded): te = Transformer "
                        "Engine's where TE and a GPU are present, else local; local = always the local spec. The "
                        "checkpoint's keys are the same for both")
    parser.add_argument("--vocab-multiple", type=positive_int, metavar="N",
                        help="pad the vocabulary to a multiple of N (and of every valid TP size), e.g. 128 for "
                        "GPU-friendly shapes. Default: only what every valid TP size needs, usually nothing. "
                        "Padded entries are not masked by Megatron-Core: their logits (0) enter every token's "
                        "softmax, so the training loss differs from the HF model's, and the rows get gradients")
    parser.add_argument("--kv-replicas", type=positive_int, default=1, metavar="R",
                        help="store each KV head R times (R must divide attention heads / KV heads), so that every "
                        "tensor-parallel size dividing KV heads x R (and the heads) is valid, e.g. above the KV heads or "
                        "with MQA. Exact: training with wit_megatron keeps the copies identical (their gradients are "
                        "summed), export takes one and refuses copies that differ. Default 1: no copies")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output directory, if it is a checkpoint this tool wrote (or empty)")
    parser.add_argument("--dry-run", action="store_true", help="print the tensor mapping and write nothing")
    args = parser.parse_args(argv)
    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron

    return _run(lambda: convert_hf_to_megatron(args.hf, args.out, dtype=args.dtype, force=args.force,
                                               vocab_multiple=args.vocab_multiple, dry_run=args.dry_run,
                                               layer_spec=args.layer_spec, kv_replicas=args.kv_replicas), args.out)


def megatron_to_hf(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Megatron-Core torch_dist checkpoint (converted or saved by training, "
                                     "any layout; written by this project, Megatron-LM or Megatron-Bridge) -> Hugging "
                                     "Face safetensors + config + tokenizer.")
    parser.add_argument("--megatron", required=True, type=Path, help="checkpoint root or iteration directory")
    parser.add_argument("--out", required=True, type=Path, help="output HF directory (refused if it exists)")
    parser.add_argument("--hf-config", type=Path, metavar="PATH",
                        help="the model's HF config.json (or a directory holding it, whose tokenizer files are then "
                        "copied when the checkpoint has none), written with the weights instead of one made from the "
                        "checkpoint's own description; checked against every setting and tensor shape the checkpoint "
                        "states. Needed where the checkpoint does not say enough (a Megatron save with no args or run "
                        "config, a family other than Llama/Qwen2/Qwen3 saved by Megatron-LM or Megatron-Bridge)")
    parser.add_argument("--max-shard-size-gb", type=positive_float, default=2.0, help="safetensors shard size limit")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output directory, if it is an HF model this tool exported (or empty)")
    parser.add_argument("--dry-run", action="store_true", help="print the tensor mapping and write nothing")
    args = parser.parse_args(argv)
    from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf

    return _run(lambda: convert_megatron_to_hf(args.megatron, args.out, force=args.force, dry_run=args.dry_run,
                                               max_shard_bytes=int(args.max_shard_size_gb * 1024**3),
                                               hf_config=args.hf_config), args.out)


def verify(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the HF model and the Megatron checkpoint on the same prompts (CPU) "
                                     "and compare logits; exit 1 beyond tolerance, 2 on refused input (e.g. an impossible layout).")
    parser.add_argument("--hf", required=True, type=Path)
    parser.add_argument("--megatron", required=True, type=Path)
    parser.add_argument("--tp", type=positive_int, default=1)
    parser.add_argument("--pp", type=positive_int, default=1)
    parser.add_argument("--vpp", type=positive_int, default=None)
    parser.add_argument("--tolerance", type=non_negative_float, default=1e-4, help="max |logit difference| allowed (fp32)")
    args = parser.parse_args(argv)
    from wit_megatron.convert.verify import run_verification

    result = {}

    def go():
        result.update(run_verification(args.hf, args.megatron, (args.tp, args.pp, args.vpp)))

    status = _run(go)
    if status:
        return status
    ok = result["max_abs_diff"] <= args.tolerance
    print(json.dumps(dict(result, tolerance=args.tolerance, ok=ok), indent=2))
    return 0 if ok else 1
