"""Export of torch_dist checkpoints this project did not write: the architecture comes from what the
checkpoint says (Megatron-LM's `args` in its common state, Megatron-Bridge's run_config.yaml), or from
`--hf-config`, checked against it; where nothing says enough, one error names the missing fields.

Megatron-LM's own saves (its `save_checkpoint`) are exported in tests/test_convert_megatron_lm.py (the
0.19.2 leg, where megatron-core's wheel ships `megatron.training`); Megatron-Bridge's layout here, from
the committed fixture tests/fixtures/megatron_bridge (its make_fixture.py says how it was made)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.convert_models import build, safetensors_of
from wit_megatron.megatron_lm_args import PARSER_DEFAULTS, parser_defaults
from wit_megatron.runtime import compat

ROOT = Path(__file__).resolve().parents[1]


def export(megatron: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--megatron", str(megatron),
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=ROOT)


def convert(hf: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def assert_same_weights(original: Path, exported: Path) -> None:
    before, after = safetensors_of(original), safetensors_of(exported)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def foreign_copy(converted: Path, out: Path, common: dict) -> Path:
    """`converted`'s weights as a checkpoint written elsewhere: no wit_megatron record and `common` as its
    common state (what a Megatron-LM save of another version, or another tool, might hold)."""
    shutil.copytree(converted / "release", out / "release")
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save(common, out / "release" / "common.pt")
    return out


def test_stored_args_hold_every_option_of_megatron_lm_parser(tmp_path):
    """Megatron-LM's loader and Megatron-Bridge's Megatron-LM reader read attributes of `args` that describe
    neither the model nor the layout (`multi_latent_attention`, ...): a converted checkpoint stores every
    option of Megatron-LM's parser with its default (the installed megatron.training's on 0.17+, the
    committed snapshot of 0.19.2's on 0.16), the model's own values over them."""
    hf = build("qwen3_qk_norm", tmp_path / "hf")
    args = torch.load(convert(hf, tmp_path / "ckpt") / "release" / "common.pt", weights_only=False)["args"]
    defaults = parser_defaults()
    assert len(defaults) > 500 and set(defaults) <= set(vars(args))
    assert args.multi_latent_attention is False and args.qk_layernorm is True and args.num_layers == 4
    assert args.kv_channels == 16 and args.normalization == "RMSNorm" and args.swiglu is True
    snapshot = json.loads(PARSER_DEFAULTS.read_text())["defaults"]
    assert set(snapshot) <= set(vars(args))
    if compat.ships_megatron_training():  # the snapshot (used on 0.16) is the installed parser's option set
        assert set(snapshot) == set(defaults)


def test_a_checkpoint_that_does_not_say_enough_is_refused_naming_the_fields(tmp_path):
    """Megatron-LM args without the norm and activation settings: the error names them and --hf-config;
    with the model's HF config as template the export is the original weights, bitwise; a template of
    another model is refused field by field; a checkpoint with no description at all is refused too."""
    hf = build("llama_gqa_tied", tmp_path / "hf")
    converted = convert(hf, tmp_path / "converted")
    args = torch.load(converted / "release" / "common.pt", weights_only=False)["args"]
    for name in ("normalization", "swiglu"):
        delattr(args, name)
    partial = foreign_copy(converted, tmp_path / "partial", {"args": args, "checkpoint_version": 3.0, "iteration": 0})

    refused = export(partial, tmp_path / "out")
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    assert "Megatron-LM args in its common state does not say normalization, swiglu; give --hf-config" in refused.stderr

    done = export(partial, tmp_path / "out", "--hf-config", str(hf))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(hf, tmp_path / "out")

    other = build("llama_gqa8_kv2", tmp_path / "other_hf")
    wrong = export(partial, tmp_path / "wrong", "--hf-config", str(other / "config.json"))
    assert wrong.returncode == 2 and "does not describe the checkpoint" in wrong.stderr
    assert "num_attention_heads: checkpoint 4, template 8" in wrong.stderr, wrong.stderr

    silent = foreign_copy(converted, tmp_path / "silent", {"checkpoint_version": 3.0, "iteration": 0})
    nothing = export(silent, tmp_path / "nothing")
    assert nothing.returncode == 2 and "nothing says which model it holds; give --hf-config" in nothing.stderr
    assert export(silent, tmp_path / "nothing", "--hf-config", str(hf)).returncode == 0
    assert_same_weights(hf, tmp_path / "nothing")


def test_megatron_lm_args_alone_give_the_hf_config(tmp_path):
    """With complete args (as Megatron-LM stores them) and no template, the HF config is written from the
    architecture: transformers loads the export, and it has the original weights and sizes."""
    from transformers import AutoConfig

    hf = build("llama_mqa_biases", tmp_path / "hf")
    converted = convert(hf, tmp_path / "converted")
    args = torch.load(converted / "release" / "common.pt", weights_only=False)["args"]
    foreign = foreign_copy(converted, tmp_path / "foreign", {"args": argparse.Namespace(**vars(args)), "iteration": 0})
    done = export(foreign, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(hf, tmp_path / "out")
    original, written = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(tmp_path / "out")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "attention_bias", "mlp_bias", "tie_word_embeddings", "head_dim"):
        assert getattr(written, key) == getattr(original, key), key


BRIDGE = ROOT / "tests/fixtures/megatron_bridge/llama_tiny"


def test_megatron_bridge_save_exports_to_the_original_weights(tmp_path):
    """Megatron-Bridge 0.6.2's save of a tiny random Llama (its own layout: `iter_0000000/` with
    run_config.yaml, the common state inside the .distcp file, no common.pt; made by
    tests/fixtures/megatron_bridge/make_fixture.py with Bridge's AutoBridge on CPU): exported from its run
    config alone, and from its iteration directory with the HF config as template, it is the HF model
    Bridge converted, bitwise; the verify tool compares it with that model."""
    from transformers import AutoConfig

    assert not (BRIDGE / "bridge/iter_0000000/common.pt").exists() and (BRIDGE / "bridge/iter_0000000/run_config.yaml").is_file()
    done = export(BRIDGE / "bridge", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(BRIDGE / "hf", tmp_path / "out")
    original, written = AutoConfig.from_pretrained(BRIDGE / "hf"), AutoConfig.from_pretrained(tmp_path / "out")
    original, written = original.to_diff_dict(), written.to_diff_dict()
    original.pop("transformers_version"), written.pop("transformers_version")
    assert original == written

    templated = export(BRIDGE / "bridge/iter_0000000", tmp_path / "templated", "--hf-config", str(BRIDGE / "hf"))
    assert templated.returncode == 0, templated.stderr[-3000:]
    assert_same_weights(BRIDGE / "hf", tmp_path / "templated")
    assert (tmp_path / "templated/generation_config.json").is_file()  # from the template's directory

    verify = subprocess.run([sys.executable, str(ROOT / "tools/verify_conversion.py"), "--hf", str(BRIDGE / "hf"),
                             "--megatron", str(BRIDGE / "bridge")], capture_output=True, text=True, cwd=ROOT)
    assert verify.returncode == 0 and json.loads(verify.stdout)["max_abs_diff"] <= 1e-4, verify.stderr[-3000:]


def test_stored_vocabulary_divisor_gives_the_stored_rows_at_tp1():
    """Megatron-LM pads its tokenizer's size up to a multiple of make_vocab_size_divisible_by x TP: the
    stored value gives the checkpoint's rows (1 without padding rows)."""
    from wit_megatron.megatron_lm_args import vocab_divisor
    from wit_megatron.model import GPTArch

    for vocab, rows in ((100, 100), (100, 128), (49152, 49152), (151665, 151936), (32001, 32064)):
        arch = GPTArch(vocab_size=rows, num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                       ffn_hidden_size=8, max_position_embeddings=8, unpadded_vocab_size=None if rows == vocab else vocab)
        d = vocab_divisor(arch)
        assert -(-vocab // d) * d == rows and (d == 1) == (rows == vocab), (vocab, rows, d)
