"""Which kernels megatron-core runs with, said once, instead of its import-time fallback warnings.

Without Transformer Engine and Apex (every CPU machine) megatron-core warns at import, from several of
its modules, that it falls back to torch: four "Transformer Engine and Apex are not installed" and two
"Apex is not installed" warnings in every command that builds a model or saves a checkpoint, none of
which the user can act on where those packages cannot run, and which drown the errors that matter.
Entry points call `quiet_fallback_warnings` at start-up, which silences exactly these (and two notes
megatron-core makes about its own defaults); `in_use` is the one line the training log and the verify
report carry instead. Every other warning stays.
"""

from __future__ import annotations

import importlib.util
import re
import warnings

import torch

FALLBACK_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # optimizer, clip_grads, FSDP mixed precision (0.16, 0.19)
    "Apex is not installed. Falling back to Torch Norm",  # the layer-spec modules' norms
    "full scope is deprecated",  # 0.16: its own default cuda_graph_scope, which no option of ours sets
    "absl.logging is not installed",  # 0.19: hyper_comm_grid's logger
)


def quiet_fallback_warnings() -> None:
    for text in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=UserWarning)


def in_use() -> str:
    """The kernels megatron-core uses here, in one line."""
    te = importlib.util.find_spec("transformer_engine") is not None
    apex = importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.optimizers") is not None
    if te and torch.cuda.is_available():
        return "Transformer Engine" + (" and Apex" if apex else "")
    missing = [name for name, present in (("Transformer Engine", te and torch.cuda.is_available()), ("Apex", apex)) if not present]
    used = "Apex's fused Adam and norms, torch for the rest" if apex else "torch's norms, Adam and multi-tensor ops"
    return f"{used} ({' and '.join(missing)}: not installed or no GPU)"
