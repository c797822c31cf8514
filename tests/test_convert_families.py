"""HF -> Megatron -> HF is bit-identical for every family and edge case (each family module's `examples`),
and the converted checkpoint gives the HF model's logits at tp1pp1, tp2pp1, tp1pp2, tp2pp2 (and with
virtual pipelining), loaded through megatron-core's dist_checkpointing with no missing or unexpected keys.
For Gemma-2/3 the test sequences are longer than the sliding window and the soft-caps bite; that each
Gemma part is needed for those logits, and the Megatron-LM flags file's account of them, are tested here too.
An index-sharded HF checkpoint (three files, each layer's q/k/v and gate/up in different files) converts to
the same Megatron checkpoint as the single file, bit for bit, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.convert_models import CASES, build, safetensors_of, shard, shard_file_of
from wit_megatron.convert.verify import hf_logits
from wit_megatron.megatron_lm_args import FLAGS_FILE
from wit_megatron.runtime.launch import run_distributed

# --dtype casts, on the cases with the most transforms (QKV biases with MQA; qk norms with head_dim).
CASTS = {"llama_mqa_biases": "bf16", "qwen3_qk_norm": "fp16"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None)]
SHARDED = "llama_gqa8_kv2"  # the case also converted from an index-sharded copy
VIRTUAL = ("llama_gqa_tied", "gemma2", "gemma3")  # also at tp1pp2 with 2 virtual stages
TOLERANCE = 1e-4
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 > the Gemma windows (4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cases = {}
    for name in CASES:
        cases[name] = dict(hf=str(build(name, root / name / "hf")), megatron=str(root / name / "megatron"),
                           back=str(root / name / "back"))
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # models stored in that dtype
        cases[f"llama_gqa_tied_{name}"] = dict(hf=str(build("llama_gqa_tied", root / name / "hf", dtype)),
                                               megatron=str(root / name / "megatron"), back=str(root / name / "back"))
    sharded = root / "sharded"
    cases["sharded"] = dict(hf=str(shard(Path(cases[SHARDED]["hf"]), sharded / "hf")), megatron=str(sharded / "megatron"),
                            back=str(sharded / "back"))
    for case, name in CASTS.items():  # float32 models converted with --dtype
        cases[f"{case}_as_{name}"] = dict(hf=cases[case]["hf"], dtype=name, megatron=str(root / f"{case}_as_{name}" / "megatron"),
                                          back=str(root / f"{case}_as_{name}" / "back"))
    results = run_distributed("tests.scenarios.convert_cases:round_trips", 1, cases=list(cases.values()))[0]
    for name, result in zip(cases, results):
        cases[name]["error"] = result["error"]
    return cases


@pytest.mark.parametrize("case", [*CASES, "llama_gqa_tied_bf16", "llama_gqa_tied_fp16", "sharded"])
def test_round_trip_is_bit_identical(converted, case):
    c = converted[case]
    assert c["error"] is None, c["error"]
    original, back = safetensors_of(Path(c["hf"])), safetensors_of(Path(c["back"]))
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert json.loads((Path(c["back"]) / "config.json").read_text()) == json.loads((Path(c["hf"]) / "config.json").read_text())
    assert (Path(c["back"]) / "generation_config.json").exists()


def test_index_sharded_checkpoint_converts_like_the_single_file(converted):
    """Three shard files and an index, as 7B+ models ship, with every layer's q/k/v projections in three
    different files and gate/up in two: the Megatron checkpoint equals, tensor for tensor and bit for
    bit, the one converted from the same model in one file (its round trip back is checked above).
    Fails when a tensor is read from the wrong file (checked by reading every tensor's byte range from
    the first shard: the conversion still ran, and 8 of 9 stored tensors differed)."""
    from wit_megatron.convert.torch_dist_reader import TorchDistReader

    c, single = converted["sharded"], converted[SHARDED]
    assert c["error"] is None, c["error"]
    index = json.loads((Path(c["hf"]) / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3 and sorted(index) == sorted(safetensors_of(Path(single["hf"])))
    for layer in range(4):
        files = {proj: index[f"model.layers.{layer}.{kind}.{proj}.weight"]
                 for kind, projs in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))) for proj in projs}
        assert len({files[p] for p in ("q_proj", "k_proj", "v_proj")}) == 3 and files["gate_proj"] != files["up_proj"]
        assert all(index[name].startswith(f"model-{shard_file_of(name) + 1:05d}") for name in index)
    expected, got = (TorchDistReader(Path(d) / "release") for d in (single["megatron"], c["megatron"]))
    assert sorted(got.tensors) == sorted(expected.tensors)
    buffers = {}
    for key, meta in expected.tensors.items():
        buffers[key] = [torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for _ in range(2)]
    expected.read({key: ((0,) * len(b[0].shape), b[0]) for key, b in buffers.items()})
    got.read({key: ((0,) * len(b[1].shape), b[1]) for key, b in buffers.items()})
    differing = [key for key, (a, b) in buffers.items() if not torch.equal(a.view(torch.uint8), b.view(torch.uint8))]
    assert not differing, f"{len(differing)} of {len(buffers)} stored tensors differ: {differing}"


@pytest.mark.parametrize("case", list(CASTS))
def test_dtype_cast_writes_the_checkpoint_and_export_in_that_dtype(converted, case):
    """--dtype on a float32 model: every stored tensor in that dtype, and export gives exactly the HF
    tensor cast to it (bit-equal), with config.json's dtype saying so."""
    from wit_megatron.convert.torch_dist_reader import TorchDistReader

    name = CASTS[case]
    c = converted[f"{case}_as_{name}"]
    assert c["error"] is None, c["error"]
    stored = TorchDistReader(Path(c["megatron"]) / "release").tensors
    assert stored and {key: meta.properties.dtype for key, meta in stored.items()} == {key: DTYPES[name] for key in stored}
    assert json.loads((Path(c["megatron"]) / "wit_megatron.json").read_text())["dtype"] == str(DTYPES[name])[6:]
    original, back = safetensors_of(Path(c["hf"])), safetensors_of(Path(c["back"]))
    assert sorted(back) == sorted(original)
    for tensor_name, tensor in original.items():
        assert tensor.dtype == torch.float32, tensor_name
        expected = tensor.to(DTYPES[name])
        assert back[tensor_name].dtype == expected.dtype, tensor_name
        assert torch.equal(back[tensor_name].view(torch.int16), expected.view(torch.int16)), tensor_name  # bitwise
    config = json.loads((Path(c["back"]) / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(DTYPES[name])[6:]


def test_logits_match_hf_at_every_layout(converted):
    tokens = TOKENS
    jobs = []
    for name in CASES:
        mqa = name == "llama_mqa_biases"  # 1 KV head: TP 1 only
        for layout in LAYOUTS:
            if not (mqa and layout[0] > 1):
                jobs.append(dict(checkpoint=converted[name]["megatron"], layout=layout, tokens=tokens))
    jobs += [dict(checkpoint=converted[name]["megatron"], layout=(1, 2, 2), tokens=tokens) for name in VIRTUAL]
    per_rank = run_distributed("tests.scenarios.convert_cases:logits", 4, jobs=jobs)
    references = {name: hf_logits(converted[name]["hf"], tokens) for name in CASES}
    failures = []
    for i, job in enumerate(jobs):
        results = [rank[i] for rank in per_rank]
        name = next(n for n in CASES if converted[n]["megatron"] == job["checkpoint"])
        assert all(not r["missing"] and not r["unexpected"] for r in results), (name, job["layout"], results[0])
        (logits,) = [r["logits"] for r in results if r["logits"] is not None]
        assert logits.shape == references[name].shape
        diff = (logits - references[name]).abs().max().item()
        if diff > TOLERANCE:
            failures.append(f"{name} at {job['layout']}: max |Δlogit| {diff:.2e}")
    assert not failures, failures


# Each Gemma part dropped from the architecture record (weights unchanged) and the logits it then gives.
DROPPED = {
    "gemma2": {"attention soft-capping": dict(attn_logit_softcapping=None),
               "final-logit soft-capping": dict(final_logit_softcapping=None),
               "sliding window": dict(sliding_window=None, window_layers=None),
               "embedding multiplier": dict(embedding_multiplier=None),
               "softmax scale": dict(softmax_scale=None),
               "(1 + w) norm weights": dict(norm_weight_plus_one=False)},
    "gemma3": {"local RoPE base": dict(rotary_base_local=None),
               "global RoPE's linear scaling": dict(rope_linear_factor=None),
               "sliding window": dict(sliding_window=None, window_layers=None, rotary_base_local=None),
               "embedding multiplier": dict(embedding_multiplier=None)},
}


def test_each_gemma_part_changes_the_logits(converted):
    """The parity above would fail without any one of them: with the part dropped from the record, the same
    weights give logits far (> 100x the tolerance) from transformers' on the test sequences."""
    jobs = [dict(checkpoint=converted[name]["megatron"], tokens=TOKENS, changes=changes)
            for name, parts in DROPPED.items() for changes in parts.values()]
    logits = run_distributed("tests.scenarios.convert_cases:logits_with_changed_arch", 1, jobs=jobs)[0]
    references = {name: hf_logits(converted[name]["hf"], TOKENS) for name in DROPPED}
    labels = [(name, part) for name, parts in DROPPED.items() for part in parts]
    diffs = {label: (result - references[label[0]]).abs().max().item() for label, result in zip(labels, logits)}
    assert all(diff > 100 * TOLERANCE for diff in diffs.values()), diffs


def test_megatron_lm_flags_file_says_what_megatron_lm_cannot_build(converted):
    """For Gemma the file starts with `#` lines naming each part stock Megatron-LM has no option for
    (passed whole, they stop Megatron-LM); the flags line expresses the rest. Other families: flags only."""
    text = (Path(converted["gemma2"]["megatron"]) / FLAGS_FILE).read_text()
    *comments, flags = text.rstrip("\n").split("\n")
    assert comments[0].startswith("# Stock Megatron-LM (pretrain_gpt.py) cannot build this model")
    stated = "\n".join(comments)
    for part in ("GeGLU", "post-norms", "word embeddings multiplied by 5.65685", "softmax scale 0.288675",
                 "attention-score soft-capping 1.5", "final-logit soft-capping 1"):
        assert part in stated, part
    assert all(line.startswith("#") for line in comments) and not flags.startswith("#")
    flags = flags.split()
    assert flags[flags.index("--window-size") + 1] == "3,0"  # a query sees itself and 3 earlier tokens
    assert flags[flags.index("--window-attn-skip-freq") + 1] == "[1,0,1,0]"
    assert "--apply-layernorm-1p" in flags and "--swiglu" not in flags
    assert "local RoPE" not in stated and "a RoPE base of its own (10)" in (
        Path(converted["gemma3"]["megatron"]) / FLAGS_FILE).read_text()
    assert "#" not in (Path(converted["qwen3_qk_norm"]["megatron"]) / FLAGS_FILE).read_text()
