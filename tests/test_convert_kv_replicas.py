"""KV-head replication (`--kv-replicas R`): each HF KV head stored R times, so that tensor parallelism
can exceed the KV heads (MQA, GQA with few KV heads). Round trips stay bit-identical; the replicated
checkpoint gives the HF model's logits at TP > KV heads (exact GQA semantics); export refuses copies
that diverged; check_layout points to the flag; and a training step with replicas equals the
unreplicated model's (gradients, clipped by the same norm, Adam updates), with the copies kept identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert_models import BASE, build, safetensors_of
from wit_megatron.convert.families import family_for
from wit_megatron.convert.hf_config import arch_from_hf_config
from wit_megatron.convert.transforms import QKV, ConversionError
from wit_megatron.convert.verify import hf_logits
from wit_megatron.model import GPTArch, check_layout
from wit_megatron.runtime.launch import run_distributed
from wit_megatron.runtime.parallel import ParallelLayout

ROOT = Path(__file__).resolve().parents[1]
# name -> (HF case, kv_replicas). llama_mqa_biases: 4 heads, 1 KV head, QKV and linear biases;
# llama_gqa8_kv2: 8 heads, 2 KV heads; qwen2_qkv_bias_tied: 4 heads, 2 KV heads, QKV bias, tied embeddings.
REPLICATED = {
    "mqa_r1": ("llama_mqa_biases", 1),
    "mqa_r2": ("llama_mqa_biases", 2),
    "mqa_r4": ("llama_mqa_biases", 4),
    "gqa_r1": ("llama_gqa8_kv2", 1),
    "gqa_r2": ("llama_gqa8_kv2", 2),
    "gqa_r4": ("llama_gqa8_kv2", 4),  # 8 query groups: TP 8 valid, so vocabulary 100 is padded to 104
    "qwen2_r2": ("qwen2_qkv_bias_tied", 2),
}
LOGIT_JOBS = [("mqa_r2", (2, 1, None)), ("mqa_r4", (4, 1, None)), ("mqa_r4", (2, 2, None)), ("gqa_r2", (4, 1, None)),
              ("gqa_r4", (4, 1, None)), ("qwen2_r2", (4, 1, None))]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv_replicas")
    hf = {case: build(case, root / case) for case in sorted({c for c, _ in REPLICATED.values()})}
    cases = {name: dict(hf=str(hf[case]), megatron=str(root / name / "megatron"), back=str(root / name / "back"),
                        kv_replicas=replicas) for name, (case, replicas) in REPLICATED.items()}
    results = run_distributed("tests.scenarios.convert_cases:round_trips", 1, cases=list(cases.values()))[0]
    for name, result in zip(cases, results):
        assert result["error"] is None, (name, result["error"])
    return cases


@pytest.mark.parametrize("name", [n for n, (_, r) in REPLICATED.items() if r > 1])
def test_round_trip_with_replicas_is_bit_identical(converted, name):
    c = converted[name]
    original, back = safetensors_of(Path(c["hf"])), safetensors_of(Path(c["back"]))
    assert sorted(back) == sorted(original)
    for tensor_name, tensor in original.items():
        assert back[tensor_name].dtype == tensor.dtype and torch.equal(back[tensor_name], tensor), tensor_name
    hf_config = json.loads((Path(c["hf"]) / "config.json").read_text())
    assert json.loads((Path(c["back"]) / "config.json").read_text()) == hf_config  # the HF KV heads again
    arch = json.loads((Path(c["megatron"]) / "wit_megatron.json").read_text())["arch"]
    kv_heads = hf_config["num_key_value_heads"]
    assert (arch["num_query_groups"], arch["kv_replicas"]) == (kv_heads * c["kv_replicas"], c["kv_replicas"])
    # Vocabulary padding follows the largest valid TP (= query groups here): only 8 groups need it for 100.
    padded = 104 if arch["num_query_groups"] == 8 else 100
    assert (arch["vocab_size"], arch["unpadded_vocab_size"]) == (padded, 100 if padded != 100 else None)


def test_logits_match_hf_at_tp_above_kv_heads(converted):
    """Query head h of the replicated model attends with HF KV head h // (heads / KV heads): the logits are
    the HF model's, loaded through dist_checkpointing with no missing or unexpected keys."""
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    jobs = [dict(checkpoint=converted[name]["megatron"], layout=layout, tokens=tokens) for name, layout in LOGIT_JOBS]
    per_rank = run_distributed("tests.scenarios.convert_cases:logits", 4, jobs=jobs)
    references = {case: hf_logits(build_dir, tokens) for case, build_dir in
                  {REPLICATED[n][0]: converted[n]["hf"] for n, _ in LOGIT_JOBS}.items()}
    failures = []
    for i, (name, layout) in enumerate(LOGIT_JOBS):
        results = [rank[i] for rank in per_rank]
        assert all(not r["missing"] and not r["unexpected"] for r in results), (name, layout, results[0])
        (logits,) = [r["logits"] for r in results if r["logits"] is not None]
        reference = references[REPLICATED[name][0]]
        assert logits.shape == reference.shape
        diff = (logits - reference).abs().max().item()
        if diff > TOLERANCE:
            failures.append(f"{name} at {layout}: max |Δlogit| {diff:.2e}")
    assert not failures, failures


def test_export_refuses_copies_that_diverged(converted, tmp_path):
    error = run_distributed("tests.scenarios.convert_cases:diverge_one_copy", 1, checkpoint=converted["mqa_r2"]["megatron"],
                            out=str(tmp_path), layer=2, delta=0.25)[0]
    assert error.startswith(f"{tmp_path / 'trained' / 'iter_0000001'}: decoder.layers.self_attention.linear_qkv.weight[2]: "
                            "the 2 copies of each KV head (kv_replicas) are not identical: v head 0 copy 1 "
                            "differs from copy 0 (largest |difference| over all copies: 0.25). The copies diverged: "
                            "the model was trained without summing the copies' gradients"), error
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained"]  # no temporary .hf.tmp-* directory left either
    # The same check on a QKV bias, in memory: GQA with 2 KV heads x 2 copies, copy 1 of head 1's key.
    arch = GPTArch(vocab_size=100, num_layers=1, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=48, max_position_embeddings=64, add_qkv_bias=True, kv_replicas=2)
    q, k, v = torch.arange(32.0), torch.arange(8.0) + 100, torch.arange(8.0) + 200
    bias = QKV.to_megatron([q, k, v], arch)
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(bias, arch), [q, k, v]))
    bias.view(4, 16)[3, 8] += 0.5  # group 3 = copy 1 of head 1: [2 query heads, k, v] x head dim 4
    with pytest.raises(ConversionError, match=r"k head 1 copy 1 differs from copy 0 \(largest \|difference\| over all "
                                              r"copies: 0\.5\)"):
        QKV.to_hf(bias, arch)


def test_layouts_beyond_the_kv_heads_name_the_flag():
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    config = dict(BASE, architectures=["LlamaForCausalLM"])
    mqa = arch_from_hf_config(llama, dict(config, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"tensor-parallel size 2 does not divide the 4 attention heads and 1 KV heads; "
                       r"valid sizes: \[1\]\. To run at TP 2, convert the HF model with --kv-replicas 2 "
                       r"\(1 KV heads x 2 identical copies = 2 query groups\)"):
        check_layout(mqa, ParallelLayout(tp=2))
    gqa = arch_from_hf_config(llama, dict(config, num_attention_heads=8, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 2\]\. To run at TP 8, .* --kv-replicas 4 \(2 KV heads x 4"):
        check_layout(gqa, ParallelLayout(tp=8))
    replicated = arch_from_hf_config(llama, dict(config, num_key_value_heads=1), kv_replicas=2)
    check_layout(replicated, ParallelLayout(tp=2))
    with pytest.raises(ValueError, match=r"the 4 attention heads and 2 query groups \(1 KV heads x 2 replicas\); "
                       r"valid sizes: \[1, 2\]\. To run at TP 4, convert the HF model with --kv-replicas 4 "):
        check_layout(replicated, ParallelLayout(tp=4))
    six = arch_from_hf_config(llama, dict(config, hidden_size=48, num_attention_heads=6, num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 3\]\. To run at TP 2, .* --kv-replicas 2 \(3 KV heads x 2"):
        check_layout(six, ParallelLayout(tp=2))  # TP below the KV heads that does not divide them
    with pytest.raises(ValueError, match=r"tensor-parallel size 3 does not divide the 4 attention heads and 1 KV heads; "
                       r"valid sizes: \[1\]$"):
        check_layout(mqa, ParallelLayout(tp=3))  # no number of copies helps: 3 does not divide the heads


def test_kv_replicas_that_do_not_split_the_heads_are_refused(tmp_path):
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    config = dict(BASE, architectures=["LlamaForCausalLM"], num_key_value_heads=1)
    with pytest.raises(ConversionError, match=r"--kv-replicas 3: the 4 attention heads share 1 KV heads \(4 each\), and "
                       r"the copies of a KV head must split its query heads evenly; valid values: \[1, 2, 4\]"):
        arch_from_hf_config(llama, config, kv_replicas=3)
    hf = build("llama_mqa_biases", tmp_path / "hf")
    tool = [sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(tmp_path / "out")]
    refused = subprocess.run([*tool, "--kv-replicas", "8"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "error: --kv-replicas 8: " in refused.stderr and "valid values: [1, 2, 4]" in refused.stderr
    dry = subprocess.run([*tool, "--kv-replicas", "4", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert '"num_query_groups": 4' in dry.stdout and '"kv_replicas": 4' in dry.stdout
    assert not (tmp_path / "out").exists()


def test_training_with_replicas_equals_the_unreplicated_model(converted, tmp_path):
    """Two steps of Megatron's Adam with gradient clipping active: replicated MQA at tp2pp2 (2 copies on
    each rank, over 2 ranks) and GQA at tp4 (one copy per rank) against the same models unreplicated at
    tp1 (dp4). Adam's eps is raised to 1e-3 here: with 1e-8 its first step is about lr·sign(g), and
    gradients within rounding of 0 flip it; unreplicated tp1 and tp2 then differ by ~1e-4 (relative)
    in their weights already. With a smooth step the comparison can be tight."""
    clip = 0.05
    jobs = {name: dict(checkpoint=converted[name]["megatron"], out=str(tmp_path / name), layout=layout, steps=2,
                       clip_grad=clip, lr=1e-2, adam_eps=1e-3)
            for name, layout in [("mqa_r1", (1, 1, None)), ("mqa_r4", (2, 2, None)), ("gqa_r1", (1, 1, None)),
                                 ("gqa_r2", (4, 1, None))]}
    per_rank = run_distributed("tests.scenarios.convert_training:train_steps", 4, jobs=list(jobs.values()))
    # Export refuses copies that are not bitwise identical: that it succeeds is the check that they are.
    run_distributed("tests.scenarios.convert_cases:exports", 1, jobs=[(job["out"], str(tmp_path / f"{name}_hf"))
                                                                       for name, job in jobs.items()])
    results = {name: [rank[i] for rank in per_rank] for i, name in enumerate(jobs)}
    for replicated, reference in [("mqa_r4", "mqa_r1"), ("gqa_r2", "gqa_r1")]:
        norms, expected_norms = results[replicated][0]["grad norms"], results[reference][0]["grad norms"]
        assert all(r["grad norms"] == norms for r in results[replicated])  # every rank reports the same
        assert min(expected_norms) > 10 * clip  # clipping is active in both steps
        assert norms == pytest.approx(expected_norms, rel=1e-5), (replicated, norms, expected_norms)

        grads = hf_named(results[replicated], converted[replicated]["megatron"])
        expected = hf_named(results[reference], converted[reference]["megatron"])
        assert sorted(grads) == sorted(expected)
        for name, grad in grads.items():
            scale = expected[name].abs().max().item()
            assert scale > 0 and (grad - expected[name]).abs().max().item() <= 1e-5 * scale, (replicated, name)

        before = safetensors_of(Path(converted[reference]["hf"]))
        after, expected_after = safetensors_of(tmp_path / f"{replicated}_hf"), safetensors_of(tmp_path / f"{reference}_hf")
        assert sorted(after) == sorted(expected_after) == sorted(before)
        for name, tensor in expected_after.items():
            scale = tensor.abs().max().item()
            assert (after[name] - tensor).abs().max().item() <= 1e-5 * scale, (replicated, name)
            assert (tensor - before[name]).abs().max().item() > 1e-3 * scale, (replicated, name)  # it trained


def hf_named(per_rank: list[dict], checkpoint: str) -> dict[str, torch.Tensor]:
    """Full gradients of all stages (local-spec names) -> HF names, through the family table's transforms
    (QKV takes one copy per KV head and requires the copies' gradients to be bitwise identical)."""
    from wit_megatron.checkpoint import read_record, resolve

    record = read_record(*resolve(Path(checkpoint)))
    arch = GPTArch.from_dict(record["arch"])
    _, family = family_for(record["hf_config"])
    full = {}
    for rank in per_rank:
        full.update(rank["grads"])
    out = {}
    for rule in family.rules_for(arch):
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            tensors = rule.transform.to_hf(full[rule.param_name("local", layer)], arch)
            out.update(zip(rule.hf_names(layer), tensors))
    return out
