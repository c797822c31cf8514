"""The verify tool passes a faithful conversion, fails (exit 1) a different model and refuses (exit 2) an
impossible layout; the family tables' local-spec names and checkpoint shapes are exactly those of
megatron-core's GPTModel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from tests.convert_models import CASES, build, safetensors_of
from wit_megatron.convert.families import family_for, megatron_shapes
from wit_megatron.convert.hf_config import arch_from_hf_config
from wit_megatron.runtime.launch import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def verify(hf: Path, megatron: Path, *layout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/verify_conversion.py"), "--hf", str(hf), "--megatron",
                           str(megatron), *layout], capture_output=True, text=True, cwd=ROOT)


def test_verify_tool_reports_and_fails_beyond_tolerance(tmp_path):
    # Gemma-2: the family with the most parts of its own (soft-capping, windows shorter than the 16 tokens, ...).
    hf, other = build("gemma2", tmp_path / "hf"), build("gemma2", tmp_path / "other", seed=1)
    run_distributed("tests.scenarios.convert_cases:round_trips", 1,
                    cases=[dict(hf=str(hf), megatron=str(tmp_path / "megatron"), back=str(tmp_path / "back"))])
    good = verify(hf, tmp_path / "megatron", "--tp", "2")
    assert good.returncode == 0, good.stderr[-3000:]
    report = json.loads(good.stdout[good.stdout.index("{"):])
    assert report["ok"] and report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert abs(report["hf_loss"] - report["megatron_loss"]) < 1e-4 and report["layout"] == [2, 1, None]
    bad = verify(other, tmp_path / "megatron", "--pp", "2")
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert not json.loads(bad.stdout[bad.stdout.index("{"):])["ok"]
    refused = verify(hf, tmp_path / "megatron", "--tp", "3")  # refused input: exit 2 with the message, no traceback
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "error: tensor-parallel size 3 does not divide" in refused.stderr and "valid sizes: [1, 2]" in refused.stderr


def test_family_tables_match_the_model_megatron_core_builds():
    """Local-spec parameter names and checkpoint shapes (`megatron_shapes`, which the exporter checks
    checkpoints against without building a model) equal those of megatron-core's own GPTModel."""
    import transformers

    from tests.convert_models import BASE, architecture

    archs, names, shapes = [], [], []
    for name, (config_class, overrides) in CASES.items():
        config = getattr(transformers, config_class)(**dict(BASE, **overrides)).to_dict()
        config["architectures"] = [architecture(config_class)]
        _, family = family_for(config)
        arch = arch_from_hf_config(family, config)
        archs.append(arch.to_dict())
        rules = family.rules_for(arch)
        names.append(sorted(rule.param_name("local", layer) for rule in rules
                            for layer in (range(arch.num_layers) if rule.per_layer else [None])))
        shapes.append({rule.megatron: megatron_shapes(arch)[rule.megatron] for rule in rules})
    models = run_distributed("tests.scenarios.convert_cases:single_rank_models", 1, archs=archs)[0]
    assert [m["names"] for m in models] == names
    assert [m["shapes"] for m in models] == shapes


def test_progress_bars_count_tensors_and_written_bytes(tmp_path):
    """HF -> Megatron shows the tensors prepared and then the bytes megatron-core's writers put on disk
    (their sum over the checkpoint's tensors); Megatron -> HF shows the tensors written."""
    hf = ROOT / "tests/data/convert/tiny-llama-hf"
    run = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out",
                          str(tmp_path / "megatron")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.replace("\r", "\n").splitlines()
    tensors = [line for line in lines if line.startswith("HF -> Megatron: tensors: 100%")]
    written = [line for line in lines if line.startswith("HF -> Megatron: writing: 100%")]
    assert tensors and "26/26" in tensors[-1], lines[-5:]  # embedding, 4 layers x 6 tensors, final norm (tied)
    total = tqdm.format_sizeof(sum(t.numel() * t.element_size() for t in safetensors_of(hf).values()), divisor=1024)
    assert written and f"{total}/{total}" in written[-1], (written[-1:], total)
    back = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron", str(tmp_path / "megatron"),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert back.returncode == 0 and "Megatron -> HF: 100%" in back.stderr.replace("\r", "\n"), back.stderr[-3000:]
