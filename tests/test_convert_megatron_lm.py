"""Converted checkpoints load through Megatron-LM's own `load_checkpoint` (`pretrain_gpt.py`'s arguments
parsing, `initialize_megatron`, `get_model`, `--load CKPT --finetune --ckpt-format torch_dist`) with the
architecture flags the converter writes to `megatron_lm_flags.txt`, and give transformers' logits.

Megatron-LM's `megatron.training` ships in megatron-core's wheel from 0.17 on: this file runs on
.ci/run's Python 3.12 / megatron-core 0.19.2 leg. Below 0.17 (0.16.1's wheel, the 3.11 leg) the tests
are skipped with that reason, decided by the version (`compat.ships_megatron_training`), so that a
wheel that should ship `megatron.training` and cannot import it fails here instead of skipping (checked
on 0.19.2 with `megatron.training` made unimportable: the old import-based skip skipped all tests,
this fails). docs/convert.md records the manual 0.16.1 run against Megatron-LM's source tree."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert_models import build
from wit_megatron.megatron_lm_args import FLAGS_FILE
from wit_megatron.runtime import compat

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not compat.ships_megatron_training(),
                                reason=f"megatron-core {'.'.join(map(str, compat.megatron_core_version()))} ships no "
                                       "megatron.training (0.17 and later do): runs on the 0.19.2 leg")


def test_megatron_training_imports():
    """What the tools use from the wheel's megatron.training imports (a broken install fails here, by name)."""
    for module in ("megatron.training.arguments", "megatron.training.checkpointing", "megatron.training.initialize",
                   "megatron.training.training", "megatron.training.datasets.data_samplers"):
        importlib.import_module(module)


def megatron_lm_load(hf: Path, ckpt: Path, *flags: str) -> dict:
    """What tools/convert_check_megatron_lm.py reports: Megatron-LM's loaded model against transformers'
    ("diff": max |Δlogit|, "top1"), the RoPE scaling arguments Megatron-LM parsed, and, when they ask for
    a factor other than GPTModel's default, the same build with the factor passed ("fixed_diff")."""
    run = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools/convert_check_megatron_lm.py"), "installed",
                          str(hf), str(ckpt), *flags, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
                         capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"Megatron-LM load_checkpoint: iteration 0, padded vocab 100, max \|logit - HF logit\| (\S+), "
                      r"top-1 agreement (\S+)\nMegatron-LM arguments: use_rope_scaling (\S+), rope_scaling_factor (\S+)\n", run.stdout)
    assert found, (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    out = {"diff": float(found.group(1)), "top1": float(found.group(2)), "use_rope_scaling": found.group(3) == "True",
           "rope_scaling_factor": float(found.group(4)), "fixed_diff": None, "returncode": run.returncode}
    fixed = re.search(r"passed to GPTModel .*: max \|logit - HF logit\| (\S+), top-1 agreement (\S+)", run.stdout)
    if fixed:
        out["fixed_diff"], out["fixed_top1"] = float(fixed.group(1)), float(fixed.group(2))
    return out


def convert(hf: Path, out: Path, notes: list | None = None) -> Path:
    """tools/convert_hf_to_megatron.py; its "note: " lines go to `notes`."""
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    if notes is not None:
        notes += [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    return out


# q/k norms with a head dim of its own; biases on every linear layer with MQA; QKV bias, tied.
@pytest.mark.parametrize("case", ["qwen3_qk_norm", "llama_mqa_biases", "qwen2_qkv_bias_tied"])
def test_megatron_lm_loads_with_the_written_flags_and_its_save_exports(tmp_path, case):
    """Megatron-LM also saves what it loaded (its own save_checkpoint, iteration 1). That save passes this
    project's checks of untrusted checkpoints (everything Megatron-LM pickles is in safe_pickle.py's
    admission list: its args, RNG and rerun state), and exports to HF from Megatron-LM's `args` alone
    (no record of ours: the family from its switches, the config written from them): the original HF
    weights bitwise, each family's config.json keys as the original's. For the Qwen2 case the verify
    tool also compares the save with the HF model (the HF config as template)."""
    from transformers import AutoConfig

    from tests.convert_models import safetensors_of
    from wit_megatron.checkpoint import RECORD, check_files, resolve

    hf = build(case, tmp_path / "hf")
    notes = []
    ckpt = convert(hf, tmp_path / "megatron", notes)
    flags = (ckpt / FLAGS_FILE).read_text().split()
    save = ["--save", str(tmp_path / "mlm"), "--save-interval", "1", "--no-save-optim"]
    result = megatron_lm_load(hf, ckpt, *flags, *save)
    assert result["diff"] <= 1e-4 and result["top1"] == 1.0 and result["returncode"] == 0 and not notes
    assert not result["use_rope_scaling"] and result["fixed_diff"] is None
    root, directory = resolve(tmp_path / "mlm")
    assert directory == tmp_path / "mlm/iter_0000001" and (directory / ".metadata").is_file() and not (root / RECORD).exists()
    check_files(directory)

    exported = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron", str(root),
                               "--out", str(tmp_path / "back")], capture_output=True, text=True, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    before, after = safetensors_of(hf), safetensors_of(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    original, written = AutoConfig.from_pretrained(hf).to_dict(), AutoConfig.from_pretrained(tmp_path / "back").to_dict()
    assert written["architectures"] == original["architectures"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "tie_word_embeddings", "head_dim", "attention_bias", "mlp_bias"):
        assert written.get(key) == original.get(key), key
    if case == "qwen2_qkv_bias_tied":
        verify = subprocess.run([sys.executable, str(ROOT / "tools/verify_conversion.py"), "--hf", str(hf), "--megatron",
                                 str(root)], capture_output=True, text=True, cwd=ROOT)
        assert verify.returncode == 0 and json.loads(verify.stdout)["max_abs_diff"] <= 1e-4, verify.stderr[-3000:]


def test_rope_scaling_factor_reaches_megatron_lm_whose_builder_drops_it(tmp_path):
    """Llama-3.2's RoPE scaling factor 32 (not Megatron's default 8): the flags file gives it to
    Megatron-LM's arguments, and with it passed to GPTModel the loaded checkpoint gives transformers'
    logits; pretrain_gpt.py's own build passes no factor (GPTModel keeps 8.0), so its logits are off,
    which this test pins down (docs/convert.md). A wrong `--rope-scaling-factor` in the flags file fails
    the first two asserts (checked with 8.0 written instead of 32.0)."""
    hf = build("llama3_rope_scaling", tmp_path / "hf")
    notes = []
    ckpt = convert(hf, tmp_path / "megatron", notes)
    assert len(notes) == 1 and "note: RoPE scaling factor 32.0: Megatron-LM's pretrain_gpt.py" in notes[0]  # the converter says so
    flags = (ckpt / FLAGS_FILE).read_text().split()
    result = megatron_lm_load(hf, ckpt, *flags)
    assert result["use_rope_scaling"] and result["rope_scaling_factor"] == 32.0
    assert result["fixed_diff"] <= 1e-4 and result["fixed_top1"] == 1.0
    assert result["diff"] > 5e-4 and result["returncode"] == 1  # Megatron-LM's own build: factor 8


def test_use_checkpoint_args_alone_drops_the_qk_norms(tmp_path):
    """Why the flags file exists: Megatron-LM's --use-checkpoint-args restores no q/k norm, RoPE scaling
    or norm epsilon (not in its load_args_from_checkpoint list), although the stored args hold them:
    a Qwen3 model then loads without its q/k norms, and its logits are far off."""
    hf = build("qwen3_qk_norm", tmp_path / "hf")
    ckpt = convert(hf, tmp_path / "megatron")
    assert megatron_lm_load(hf, ckpt, "--use-checkpoint-args")["diff"] > 0.1


def test_the_gemma_flags_file_stops_megatron_lm(tmp_path):
    """Stock Megatron-LM cannot build Gemma-2 (soft-capping, post-norms, GeGLU with tanh GELU, ...): given
    the whole flags file, it stops on the `#` lines that say so instead of loading the weights into a
    different model."""
    hf = build("gemma2", tmp_path / "hf")
    ckpt = convert(hf, tmp_path / "megatron")
    words = (ckpt / FLAGS_FILE).read_text().split()
    run = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools/convert_check_megatron_lm.py"), "installed",
                          str(hf), str(ckpt), *words, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "unrecognized arguments: # Stock Megatron-LM" in run.stderr, run.stderr[-3000:]
