"""examples/pretrain_wit.py end to end under torchrun at tp1pp2: it loads a converted checkpoint, builds
the layer spec the converter recorded, trains (the loss falls on the synthetic task), saves, and the save
exports to HF with the original shapes and dtypes and trained (changed) values."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_HF = ROOT / "tests/data/convert/tiny-llama-hf"


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_pretrain_example_loads_trains_saves_and_exports(tmp_path):
    ckpt, trained, hf = tmp_path / "megatron", tmp_path / "trained", tmp_path / "hf"
    tool("convert_hf_to_megatron.py", "--hf", str(TINY_HF), "--out", str(ckpt), "--layer-spec", "local")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "examples/pretrain_wit.py", "--tp", "1", "--pp", "2", "--load", str(ckpt), "--save", str(trained),
         "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "32",
         "--warmup-iters", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "layer spec: local" in run.stdout
    losses = [float(x) for x in re.findall(r"WIT loss ([0-9.naif]+)", run.stdout)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), run.stdout
    assert losses[-1] < losses[0], losses
    assert json.loads((trained / "wit_megatron.json").read_text())["layer_spec"] == "local"

    tool("convert_megatron_to_hf.py", "--megatron", str(trained), "--out", str(hf))
    before, after = load_file(TINY_HF / "model.safetensors"), load_file(hf / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    changed = [k for k in before if not before[k].equal(after[k])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))  # training moves every tensor


def test_recorded_layer_spec_decides_what_training_builds(monkeypatch):
    """"local" is always honoured; "te" (and no record) means TE's spec only where TE can run."""
    from wit_megatron import model

    for te_present, expected in ((True, {"te": "te", None: "te", "local": "local"}),
                                 (False, {"te": "local", None: "local", "local": "local"})):
        monkeypatch.setattr(model, "transformer_engine_available", lambda: te_present)
        assert {k: model.preferred_layer_spec(k) for k in expected} == expected
