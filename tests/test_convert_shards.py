"""Megatron -> HF with a shard size limit: several model-0000X-of-0000N.safetensors files and an index
that transformers loads, every tensor bit-identical to the original HF file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.convert_models import safetensors_of

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/data/convert"


def test_export_in_several_shards_loads_in_transformers(tmp_path):
    import transformers
    from safetensors import safe_open

    hf, out = FIXTURES / "tiny-llama-hf", tmp_path / "hf"
    # 0.00002 GiB = 21,474 bytes: the 100x32 fp32 embedding (12,800 bytes) and about one layer per shard.
    result = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron",
                             str(FIXTURES / "tiny-llama-mcore-0.16.1"), "--out", str(out), "--max-shard-size-gb", "0.00002"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count >= 3 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    holders: dict[str, list[str]] = {}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert len(f.keys()) >= 1
            for name in f.keys():
                holders.setdefault(name, []).append(shard)
    original = safetensors_of(hf)
    assert sorted(index["weight_map"]) == sorted(holders) == sorted(original)
    assert all(index["weight_map"][name] == files[0] and len(files) == 1 for name, files in holders.items())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    exported = safetensors_of(out)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(loaded.lm_head.weight, original["model.embed_tokens.weight"])  # tied, as in the original
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(tokens).logits
        assert torch.equal(loaded(tokens).logits, reference)
