"""Rank-side code of the conversion tests (run through `run_distributed`)."""

from __future__ import annotations

import traceback

import torch

from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf
from wit_megatron.convert.verify import load_model, megatron_logits


def round_trips(cases: list[dict]) -> list[dict]:
    """One rank. Each case: {"hf", "megatron", "back"} directories (+ optional "dtype", "vocab_multiple");
    HF -> Megatron -> HF. Returns {"error": traceback or None} per case."""
    results = []
    for case in cases:
        try:
            convert_hf_to_megatron(case["hf"], case["megatron"], dtype=case.get("dtype"),
                                   vocab_multiple=case.get("vocab_multiple"), progress=False)
            convert_megatron_to_hf(case["megatron"], case["back"], progress=False)
            results.append({"error": None})
        except Exception:
            results.append({"error": traceback.format_exc()})
    return results


def logits(jobs: list[dict]) -> list[dict]:
    """Every rank. Each job: {"checkpoint", "layout": (tp, pp, vpp), "tokens": [b, s]}."""
    out = []
    for job in jobs:
        result = megatron_logits(job["checkpoint"], tuple(job["layout"]), job["tokens"])
        out.append(dict(result, layout=tuple(job["layout"]), checkpoint=job["checkpoint"]))
    return out


def next_token_nll(jobs: list[dict]) -> list[dict]:
    """Every rank (pp 1). Each job: {"checkpoint", "tp", "tokens": [b, s]}. Megatron's own training loss:
    GPTModel with labels (vocab-parallel cross entropy over all padded rows), per token [b, s-1]."""
    out = []
    for job in jobs:
        (model,), arch, missing, unexpected = load_model(job["checkpoint"], (job["tp"], 1, None))
        model.eval()
        tokens = job["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        with torch.no_grad():
            nll = model(inputs, positions, None, labels=labels)
        out.append({"nll": nll.float(), "vocab_size": arch.vocab_size, "missing": missing, "unexpected": unexpected})
    return out


def export(checkpoint: str, out: str) -> None:
    """One rank: Megatron -> HF only (for checkpoints saved by training)."""
    convert_megatron_to_hf(checkpoint, out, progress=False)


def single_rank_models(archs: list[dict]) -> list[dict]:
    """One rank: of a single-rank GPTModel (local layer spec) of each GPTArch dict, the sorted parameter
    names and {checkpoint key: shape of one layer's tensor} of its sharded_state_dict."""
    from wit_megatron.convert.checkpoint import ensure_single_process, meta_model, tensor_entries
    from wit_megatron.model import GPTArch

    ensure_single_process()
    out = []
    for arch in archs:
        model = meta_model(GPTArch.from_dict(arch), torch.float32)
        shapes = {key: tuple(entry.data.shape) for _, key, _, entry in tensor_entries(model.sharded_state_dict())}
        out.append({"names": sorted(n for n, _ in model.named_parameters()), "shapes": shapes})
    return out
