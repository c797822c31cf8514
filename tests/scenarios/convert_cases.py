"""Rank-side code of the conversion tests (run through `run_distributed`)."""

from __future__ import annotations

import traceback

import torch

from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf
from wit_megatron.convert.verify import load_model, megatron_logits


def round_trips(cases: list[dict]) -> list[dict]:
    """One rank. Each case: {"hf", "megatron", "back"} directories (+ optional "dtype", "vocab_multiple",
    "kv_replicas"); HF -> Megatron -> HF. Returns {"error": traceback or None} per case."""
    results = []
    for case in cases:
        try:
            convert_hf_to_megatron(case["hf"], case["megatron"], dtype=case.get("dtype"),
                                   vocab_multiple=case.get("vocab_multiple"), kv_replicas=case.get("kv_replicas", 1),
                                   progress=False)
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


def logits_with_changed_arch(jobs: list[dict]) -> list[dict]:
    """One rank. Each job: {"checkpoint", "tokens", "changes": {GPTArch field: value}}: the logits at tp1pp1
    of the stored weights in a model whose architecture has those fields changed."""
    import dataclasses
    from pathlib import Path

    from wit_megatron import checkpoint as ckpt
    from wit_megatron.convert.verify import model_logits
    from wit_megatron.model import build_model, transformer_config
    from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel

    out = []
    for job in jobs:
        opened = ckpt.open_checkpoint(Path(job["checkpoint"]))
        arch = dataclasses.replace(opened.arch, **job["changes"])
        init_model_parallel(ParallelLayout())
        chunks = build_model(arch, transformer_config(arch, ParallelLayout(), calculate_per_token_loss=False))
        missing, unexpected = ckpt.load_into_model(chunks, opened.directory)
        assert not missing and not unexpected, (missing, unexpected)
        out.append(model_logits(chunks, arch, job["tokens"]))
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


def exports(jobs: list[tuple[str, str]]) -> None:
    """One rank: Megatron -> HF of each (checkpoint, out)."""
    for checkpoint, out in jobs:
        convert_megatron_to_hf(checkpoint, out, progress=False)


def diverge_one_copy(checkpoint: str, out: str, layer: int, delta: float) -> str:
    """One rank: load a checkpoint with kv_replicas = 2 at tp1, change one value in the second copy of
    KV head 0's value rows in `layer`, save it as training would, export it. Returns the export's error."""
    from pathlib import Path

    from wit_megatron import checkpoint as ckpt
    from wit_megatron.convert.transforms import ConversionError, head_dim

    (model,), arch, missing, unexpected = load_model(checkpoint, (1, 1, None))
    assert arch.kv_replicas == 2 and not missing and not unexpected
    d = head_dim(arch)
    q_rows = arch.num_attention_heads // arch.num_query_groups * d
    weight = dict(model.named_parameters())[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"]
    with torch.no_grad():  # group 1 = copy 1 of KV head 0: [its q rows, k rows, v rows]
        weight[(q_rows + 2 * d) + q_rows + d, 0] += delta
    record = ckpt.read_record(*ckpt.resolve(Path(checkpoint)))
    ckpt.save([model], Path(out) / "trained", iteration=1, record=record)
    try:
        convert_megatron_to_hf(Path(out) / "trained", Path(out) / "hf", progress=False)
    except ConversionError as e:
        return str(e)
    return "no error"


def single_rank_models(archs: list[dict]) -> list[dict]:
    """One rank: of a single-rank GPTModel (local layer spec) of each GPTArch dict, the sorted parameter
    names and {checkpoint key: shape of one layer's tensor} of its sharded_state_dict."""
    from wit_megatron.convert.sharded import meta_model, tensor_entries
    from wit_megatron.runtime.parallel import init_single_process
    from wit_megatron.model import GPTArch

    init_single_process()
    out = []
    for arch in archs:
        model = meta_model(GPTArch.from_dict(arch), torch.float32)
        shapes = {key: tuple(entry.data.shape) for _, key, _, entry in tensor_entries(model.sharded_state_dict())}
        out.append({"names": sorted(n for n, _ in model.named_parameters()), "shapes": shapes})
    return out


def conversions_failing_in_the_write(jobs: list[dict]) -> list[dict]:
    """One rank. Each job: {"hf", "out", "force"}: HF -> Megatron with `checkpoint.write_layout`, the last
    step of the write, raising OSError after it has written the record and the tracker into the
    temporary directory (the torch_dist save and the assets are there already). Returns per job
    {"error": the OSError's message or None, "written": the temporary directory's files at the failure}."""
    from pathlib import Path

    from wit_megatron import checkpoint as ckpt

    real = ckpt.write_layout
    results = []
    for job in jobs:
        written = []

        def fail(root: Path, *args):
            real(root, *args)
            written.extend(sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()))
            raise OSError(f"disk full while writing {root}")

        ckpt.write_layout = fail
        try:
            convert_hf_to_megatron(job["hf"], job["out"], force=job["force"], progress=False)
            results.append({"error": None, "written": written})
        except OSError as e:
            results.append({"error": str(e), "written": written})
        finally:
            ckpt.write_layout = real
    return results
