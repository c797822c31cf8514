"""Every bad input is refused up front with a message that says what is wrong; the CLIs print it,
exit 2 and leave no output behind; a dry run prints the mapping and writes nothing."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert_models import build
from wit_megatron.checkpoint import CheckpointError
from wit_megatron.convert import cli as cli_module
from wit_megatron.convert.families import family_for
from wit_megatron.convert.hf_config import arch_from_hf_config, rope_settings
from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import LayoutError, check_layout
from wit_megatron.runtime.launch import run_distributed
from wit_megatron.runtime.parallel import ParallelLayout

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests/data/convert/tiny-llama-mcore-0.16.1"  # tests/data/convert/tiny-llama-hf, converted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build("llama_gqa_tied", tmp_path_factory.mktemp("errors") / "hf")


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        dst.joinpath(path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True, cwd=ROOT)


def refused_by_cli(capsys, tool: str, *args: str) -> str:
    """The console script's function in this process (a traceback would fail the test) with --dry-run,
    which is refused by the same checks as a conversion (so an input that is not refused converts
    nothing here): exit status 2; returns the message it printed."""
    assert getattr(cli_module, tool)([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_unknown_architecture_names_the_supported_ones(tiny, tmp_path):
    hf = edited_copy(tiny, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "
                       r"Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                       r"Qwen3ForCausalLM"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def test_shapes_that_do_not_match_the_config(tiny, tmp_path):
    dims = "vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads={kv}, head_dim=8, intermediate_size={ffn}"
    hf = edited_copy(tiny, tmp_path / "ffn", intermediate_size=64)
    with pytest.raises(ConversionError, match=re.escape(
            "model.layers.0.mlp.gate_proj.weight in model.safetensors has shape (48, 32); config.json implies (64, 32) "
            f"({dims.format(kv=2, ffn=64)})")):
        convert_hf_to_megatron(hf, tmp_path / "out")
    hf = edited_copy(tiny, tmp_path / "heads", num_key_value_heads=4)
    with pytest.raises(ConversionError, match=re.escape(
            "model.layers.0.self_attn.k_proj.weight in model.safetensors has shape (16, 32); config.json implies (32, 32) "
            f"({dims.format(kv=4, ffn=48)})")):
        convert_hf_to_megatron(hf, tmp_path / "out")
    hf = edited_copy(tiny, tmp_path / "layers", num_hidden_layers=5)
    with pytest.raises(ConversionError, match=r"lacks \d+ tensor\(s\) its config requires, e.g. model.layers.4"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    hf = edited_copy(tiny, tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(ConversionError, match=r"lacks 1 tensor\(s\).*lm_head.weight"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def with_tensors(src: Path, dst: Path, **replaced: torch.Tensor) -> Path:
    """A copy of the HF model `src` whose model.safetensors has the `replaced` tensors (dots as "__")."""
    from safetensors.torch import load_file, save_file

    dst = edited_copy(src, dst)
    tensors = load_file(src / "model.safetensors")
    tensors.update({name.replace("__", "."): tensor for name, tensor in replaced.items()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("dry_run", [True, False])
def test_every_hf_tensor_shape_is_checked_before_anything_is_written(tiny, tmp_path, capsys, dry_run):
    """Tensors passed through unchanged (norms, o_proj) were checked only by megatron-core's save (naming
    the Megatron key alone), and a dry run accepted them."""
    out = tmp_path / "out"
    args = ["--out", str(out)] + (["--dry-run"] if dry_run else [])
    norm = with_tensors(tiny, tmp_path / "norm", model__layers__2__post_attention_layernorm__weight=torch.ones(31))
    assert cli_module.hf_to_megatron(["--hf", str(norm), *args]) == 2
    assert capsys.readouterr().err == (
        "error: model.layers.2.post_attention_layernorm.weight in model.safetensors has shape (31,); config.json implies "
        "(32,) (vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, "
        "intermediate_size=48)\n")
    o_proj = with_tensors(tiny, tmp_path / "o_proj", model__layers__0__self_attn__o_proj__weight=torch.zeros(32, 16))
    assert cli_module.hf_to_megatron(["--hf", str(o_proj), *args]) == 2
    assert capsys.readouterr().err.startswith(
        "error: model.layers.0.self_attn.o_proj.weight in model.safetensors has shape (32, 16); config.json implies (32, 32) (")
    embedding = with_tensors(tiny, tmp_path / "embedding", model__embed_tokens__weight=torch.zeros(100, 31))
    assert cli_module.hf_to_megatron(["--hf", str(embedding), *args]) == 2
    assert capsys.readouterr().err.startswith(
        "error: model.embed_tokens.weight in model.safetensors has shape (100, 31); config.json implies (100, 32) (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding", "norm", "o_proj"]


def test_sources_of_one_checkpoint_tensor_must_share_a_dtype(tiny, tmp_path, capsys):
    """q, k and v become one tensor: concatenating a bfloat16 q with float32 k and v would promote it silently."""
    from safetensors.torch import load_file

    q = load_file(tiny / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    hf = with_tensors(tiny, tmp_path / "hf", model__layers__1__self_attn__q_proj__weight=q.to(torch.bfloat16))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(tmp_path / "out")) == (
        "decoder.layers.self_attention.linear_qkv.weight[1] is made of HF tensors of different dtypes "
        "(model.layers.1.self_attn.q_proj.weight bfloat16 in model.safetensors, model.layers.1.self_attn.k_proj.weight "
        "float32 in model.safetensors, model.layers.1.self_attn.v_proj.weight float32 in model.safetensors); a checkpoint "
        "tensor has one dtype: pass --dtype to cast them all")
    assert cli_module.hf_to_megatron(["--hf", str(hf), "--out", str(tmp_path / "out"), "--dtype", "fp32", "--dry-run"]) == 0
    assert not (tmp_path / "out").exists()


def test_unrepresentable_configs_are_refused():
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    with pytest.raises(ConversionError, match=r"rope scaling of type 'yarn' cannot be represented.*supported: "
                       r"none/'default', and 'llama3' with low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192"):
        arch_from_hf_config(llama, dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConversionError, match=r"low_freq_factor=2.0 would drift: megatron-core fixes low_freq_factor=1"):
        arch_from_hf_config(llama, dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    with pytest.raises(ConversionError, match=r"attention_bias=True: .*attention_bias and mlp_bias must be equal"):
        arch_from_hf_config(llama, dict(base, attention_bias=True, mlp_bias=False))
    _, mistral = family_for({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(ConversionError, match=r"sliding_window=4096: sliding-window attention"):
        arch_from_hf_config(mistral, dict(base, sliding_window=4096, max_position_embeddings=32768))
    # Both config generations give the same rope settings (v4 rope_theta/rope_scaling, v5 rope_parameters).
    v4 = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": dict(v4["rope_scaling"], rope_theta=5e5)}
    assert rope_settings(v4) == rope_settings(v5) == (5e5, 32.0)


LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def refused(architecture: str, config: dict, match: str) -> None:
    _, family = family_for({"architectures": [architecture]})
    with pytest.raises(ConversionError, match=match):
        arch_from_hf_config(family, config)


def test_llama3_rope_scaling_lacking_a_key_names_it(tiny, tmp_path):
    """It was a KeyError (a traceback from the CLI); transformers requires all four keys too."""
    no_factor = {k: v for k, v in LLAMA3.items() if k != "factor"}
    refused("LlamaForCausalLM", dict(LLAMA, rope_scaling=no_factor),
            r"^config.json rope_scaling of type 'llama3' lacks factor \(required: factor, low_freq_factor, "
            r"high_freq_factor, original_max_position_embeddings\)$")
    v5 = {k: v for k, v in LLAMA3.items() if k not in ("high_freq_factor", "original_max_position_embeddings")}
    refused("LlamaForCausalLM", dict(LLAMA, rope_parameters=dict(v5, rope_theta=5e5)),
            r"^config.json rope_parameters of type 'llama3' lacks high_freq_factor, original_max_position_embeddings ")
    hf = edited_copy(tiny, tmp_path / "hf", rope_parameters=dict(no_factor, rope_theta=5e5))
    result = cli("convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: config.json rope_parameters of type 'llama3' lacks factor (required: " in result.stderr
    assert not (tmp_path / "out").exists()


def test_config_values_of_the_wrong_type_are_named():
    """Each was an uncaught KeyError, TypeError, ValueError or ZeroDivisionError, or was taken as it came."""
    refused("LlamaForCausalLM", dict(LLAMA, rope_scaling=dict(LLAMA3, factor="8")),
            r"^config.json rope_scaling.factor='8': expected a number$")
    refused("LlamaForCausalLM", dict(LLAMA, rope_scaling=dict(LLAMA3, low_freq_factor=None)),
            r"^config.json rope_scaling of type 'llama3' lacks low_freq_factor ")
    refused("LlamaForCausalLM", dict(LLAMA, rope_scaling="llama3"), r"^config.json rope_scaling='llama3': expected an object$")
    refused("LlamaForCausalLM", dict(LLAMA, rope_theta="1e4"), r"^config.json rope_theta='1e4': expected a number$")
    refused("LlamaForCausalLM", dict(LLAMA, rope_parameters={"full_attention": {"rope_type": "default"},
                                                             "sliding_attention": {"rope_type": "default"}}),
            r"^config.json rope_parameters holds per-layer-type settings \(full_attention, sliding_attention\)")
    refused("LlamaForCausalLM", {k: v for k, v in LLAMA.items() if k != "num_attention_heads"},
            r"^config.json lacks num_attention_heads$")
    refused("LlamaForCausalLM", dict(LLAMA, hidden_size="32"), r"^config.json hidden_size='32': expected a positive integer$")
    refused("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=0),
            r"^config.json num_key_value_heads=0: expected a positive integer$")
    refused("LlamaForCausalLM", dict(LLAMA, num_key_value_heads=3),
            r"^config.json num_key_value_heads=3 does not divide num_attention_heads=4$")
    refused("LlamaForCausalLM", dict(LLAMA, tie_word_embeddings="yes"),
            r"^config.json tie_word_embeddings='yes': expected true or false$")
    refused("MistralForCausalLM", dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window="4096"),
            r"^config.json sliding_window='4096': sliding-window attention is not represented")


def test_unsupported_model_features_are_refused_by_name():
    partial = r"partial_rotary_factor=0.5 is not supported \(only 1.0: RoPE on the whole head\)$"
    refused("LlamaForCausalLM", dict(LLAMA, partial_rotary_factor=0.5), r"^config.json " + partial)
    # transformers v5 writes it into rope_parameters.
    refused("LlamaForCausalLM", dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                             "partial_rotary_factor": 0.5}),
            r"^config.json rope_parameters." + partial)
    refused("LlamaForCausalLM", dict(LLAMA, hidden_act="gelu"),
            r"^config.json hidden_act='gelu': Megatron-Core's gated MLP here is SwiGLU \(silu\)$")
    refused("LlamaForCausalLM", dict(LLAMA, pretraining_tp=2), r"^config.json pretraining_tp=2: pretraining_tp > 1 changes the numerics$")
    refused("LlamaForCausalLM", dict(LLAMA, attention_bias=False, mlp_bias=True),
            r"^config.json attention_bias=False: Megatron-Core has one switch \(add_bias_linear\) .* "
            r"attention_bias and mlp_bias must be equal$")
    refused("Qwen2ForCausalLM", dict(LLAMA, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=32),
            r"^config.json use_sliding_window=True: sliding-window attention is not represented in this converter's Megatron model$")
    refused("Qwen3ForCausalLM", dict(LLAMA, architectures=["Qwen3ForCausalLM"], use_sliding_window=True),
            r"^config.json use_sliding_window=True: sliding-window attention")
    refused("MistralForCausalLM", dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window=32),
            r"^config.json sliding_window=32: sliding-window attention is not represented in this converter's Megatron "
            r"model; a window shorter than max_position_embeddings would drift$")
    # What the refusals let through: Qwen2's inactive window, a Mistral window covering every position, the defaults.
    _, qwen2 = family_for({"architectures": ["Qwen2ForCausalLM"]})
    assert arch_from_hf_config(qwen2, dict(LLAMA, use_sliding_window=False, sliding_window=32)).add_qkv_bias
    _, mistral = family_for({"architectures": ["MistralForCausalLM"]})
    arch_from_hf_config(mistral, dict(LLAMA, sliding_window=64))
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    arch = arch_from_hf_config(llama, dict(LLAMA, hidden_act="silu", pretraining_tp=1, partial_rotary_factor=1.0,
                                           rope_scaling=LLAMA3))
    assert arch.rope_scaling_factor == 8.0


def test_vocab_padding_is_sized_for_every_valid_tp():
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=48, max_position_embeddings=64)
    # Only what every valid TP size (1, 2, 4, 8) needs: none for 32000, 7 rows for 32001.
    assert (arch_from_hf_config(llama, dict(base, vocab_size=32000)).vocab_size) == 32000
    arch = arch_from_hf_config(llama, dict(base, vocab_size=32001))
    assert (arch.vocab_size, arch.unpadded_vocab_size) == (32008, 32001)
    arch = arch_from_hf_config(llama, dict(base, vocab_size=32000), vocab_multiple=384)  # and every valid TP
    assert (arch.vocab_size, arch.unpadded_vocab_size) == (32256, 32000)
    arch = arch_from_hf_config(llama, dict(base, vocab_size=49152, num_attention_heads=9, num_key_value_heads=3, hidden_size=576))
    assert (arch.vocab_size, arch.unpadded_vocab_size) == (49152, None)  # SmolLM2: TP 1 and 3 divide it
    llama3 = dict(base, vocab_size=128256, num_attention_heads=32)
    assert arch_from_hf_config(llama, llama3).vocab_size == 128256  # TP <= 8


def test_impossible_layouts_name_the_valid_sizes(tiny):
    _, llama = family_for({"architectures": ["LlamaForCausalLM"]})
    config = json.loads((tiny / "config.json").read_text())
    mqa = arch_from_hf_config(llama, dict(config, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"tensor-parallel size 2 does not divide the 4 attention heads and 1 KV heads; valid sizes: \[1\]"):
        check_layout(mqa, ParallelLayout(tp=2))
    arch = arch_from_hf_config(llama, config)
    with pytest.raises(ValueError, match=r"4 layers cannot be split into pp\*vpp = 3 stages; valid pp\*vpp: \[1, 2, 4\]"):
        check_layout(arch, ParallelLayout(pp=3))
    with pytest.raises(LayoutError, match=r"4 layers cannot be split into pp\*vpp = 8 stages; valid pp\*vpp: \[1, 2, 4\]"):
        check_layout(arch, ParallelLayout(pp=2, vpp=4))
    # TP 4 divides the 8 heads and 4 KV heads but not the MLP's 6 intermediate rows: megatron-core's
    # divide() would assert while building the model.
    odd_mlp = arch_from_hf_config(llama, dict(config, num_attention_heads=8, num_key_value_heads=4, intermediate_size=6))
    with pytest.raises(LayoutError, match=r"^tensor-parallel size 4 does not divide ffn_hidden_size 6 \(the MLP's intermediate "
                       r"size\); valid sizes: \[1, 2\] \(those dividing the 8 attention heads, 4 KV heads and ffn_hidden_size 6\)$"):
        check_layout(odd_mlp, ParallelLayout(tp=4))
    # Where the heads are in the way too, no number of KV-head copies helps while the MLP does not split.
    with pytest.raises(LayoutError, match=r"^tensor-parallel size 4 does not divide the 4 attention heads and 1 KV heads; "
                       r"valid sizes: \[1\]$"):
        check_layout(arch_from_hf_config(llama, dict(config, num_key_value_heads=1, intermediate_size=6)), ParallelLayout(tp=4))
    # The vocabulary is padded for the valid sizes only: TP 2 at most, so 101 rows become 102, not 104.
    assert arch_from_hf_config(llama, dict(config, vocab_size=101, num_attention_heads=8, num_key_value_heads=4,
                                           intermediate_size=6)).vocab_size == 102


def test_hf_directory_without_config_or_weights(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(tiny / "model.safetensors", weights_only)
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(weights_only), "--out", str(out)) == (
        f"{weights_only}: no config.json (is this a Hugging Face model directory?)")
    (weights_only / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(weights_only), "--out", str(out)).startswith(
        f"{weights_only / 'config.json'}: not a JSON file (")
    (weights_only / "config.json").write_text('["LlamaForCausalLM"]')
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(weights_only), "--out", str(out)) == (
        f"{weights_only / 'config.json'}: expected a JSON object, found list")

    config_only = edited_copy(tiny, tmp_path / "config_only")
    (config_only / "model.safetensors").unlink()
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(config_only), "--out", str(out)) == (
        f"{config_only}: no safetensors weights (found: config.json, generation_config.json)")
    # An index naming a shard that is not there.
    (config_only / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(config_only), "--out", str(out)) == (
        f"{config_only / 'model-00001-of-00002.safetensors'}: no such safetensors file")
    (config_only / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(config_only), "--out", str(out)) == (
        f"{config_only / 'model.safetensors.index.json'}: unreadable index, expected a JSON object with a weight_map "
        "(KeyError: 'weight_map')")
    assert not out.exists()


def test_unreadable_safetensors_files_are_named(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    hf = edited_copy(tiny, tmp_path / "hf")
    weights = hf / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:9] + b"'" + good[10:])  # the header's first key: '...", not "..."
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)).startswith(
        f"{weights}: unreadable safetensors header (Expecting property name enclosed in double quotes")
    weights.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)) == (
        f"{weights}: corrupt safetensors header (it claims {1 << 40} bytes, the file has {len(good)})")
    weights.write_bytes(good[:5])
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)) == (
        f"{weights}: not a safetensors file (shorter than 8 bytes)")
    weights.write_bytes(good)

    extra = hf / "extra.safetensors"
    extra.write_bytes(safetensors_bytes({"model.norm.bias": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}},
                                        bytes(8)))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)) == (
        f"{extra}: tensor model.norm.bias has unsupported dtype U32 "
        "(supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)")
    extra.write_bytes(safetensors_bytes({"model.norm.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                        bytes(4)))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)) == (
        f"{extra}: corrupt safetensors header entry for tensor model.norm.bias: shape [2] F32 does not fit "
        "data_offsets [0, 4]")
    extra.write_bytes(safetensors_bytes({"model.norm.bias": {"dtype": "F32", "shape": [1]}}, bytes(4)))
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(out)) == (
        f"{extra}: corrupt safetensors header entry for tensor model.norm.bias: {{'dtype': 'F32', 'shape': [1]}}")
    assert not out.exists()


def test_tensors_with_no_place_in_the_model_are_refused(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    hf = edited_copy(tiny, tmp_path / "hf")
    save_file({"model.layers.4.mlp.down_proj.weight": torch.zeros(32, 48), "visual.proj.weight": torch.zeros(2, 2),
               "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)},  # a buffer: ignored
              hf / "extra.safetensors")
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(tmp_path / "out")) == (
        "2 checkpoint tensor(s) have no place in the model its config describes, e.g. "
        "model.layers.4.mlp.down_proj.weight in extra.safetensors, visual.proj.weight in extra.safetensors")
    assert not (tmp_path / "out").exists()


def test_tied_model_with_an_lm_head_in_the_file(tiny, tmp_path, capsys):
    """Accepted when the file's lm_head.weight is the embedding, refused (naming both files) when it is not."""
    from safetensors.torch import load_file, save_file

    embedding = load_file(tiny / "model.safetensors")["model.embed_tokens.weight"]
    hf = edited_copy(tiny, tmp_path / "hf")
    save_file({"lm_head.weight": embedding.clone()}, hf / "head.safetensors")
    assert cli_module.hf_to_megatron(["--hf", str(hf), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    mapping = capsys.readouterr().out
    assert "model.embed_tokens.weight [100, 32] float32 -> embedding.word_embeddings.weight (vocab pad)" in mapping
    assert "lm_head" not in mapping and "output_layer" not in mapping

    different = embedding.clone()
    different[7, 3] += 1e-3
    save_file({"lm_head.weight": different}, hf / "head.safetensors")
    assert refused_by_cli(capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(tmp_path / "out")) == (
        "config.json ties embeddings (tie_word_embeddings) but lm_head.weight in head.safetensors differs from "
        "model.embed_tokens.weight in model.safetensors (a tied model has one matrix for both)")
    save_file({"lm_head.weight": embedding[:99].clone()}, hf / "head.safetensors")  # another shape
    assert "but lm_head.weight in head.safetensors differs" in refused_by_cli(
        capsys, "hf_to_megatron", "--hf", str(hf), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_megatron_side_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a Megatron checkpoint \(no latest_checkpointed_iteration.txt"):
        convert_megatron_to_hf(tmp_path, tmp_path / "out")
    # A record that does not describe the stored tensors: named key, stored and expected shapes.
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(ROOT / "tests/data/convert/tiny-llama-mcore-0.16.1", checkpoint)
    record = json.loads((checkpoint / "wit_megatron.json").read_text())
    record["arch"]["ffn_hidden_size"] = 40
    (checkpoint / "wit_megatron.json").write_text(json.dumps(record))
    with pytest.raises(ConversionError, match=r"decoder.layers.mlp.linear_fc1.weight has shape \(4, 96, 32\), "
                                              r"the recorded architecture needs \(4, 80, 32\)"):
        convert_megatron_to_hf(checkpoint, tmp_path / "out")
    record["arch"]["ffn_hidden_size"], record["arch"]["tie_embeddings"] = 48, False
    (checkpoint / "wit_megatron.json").write_text(json.dumps(record))
    with pytest.raises(ConversionError, match=r"checkpoint lacks output_layer.weight"):
        convert_megatron_to_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_stored_tensors_the_record_has_no_place_for(tmp_path, capsys):
    """A Qwen3 checkpoint whose record says no qk-norm: export used to write the model without the
    stored q/k norms."""
    case = dict(hf=str(build("qwen3_qk_norm", tmp_path / "hf")), megatron=str(tmp_path / "megatron"),
                back=str(tmp_path / "back"))
    (result,) = run_distributed("tests.scenarios.convert_cases:round_trips", 1, cases=[case])[0]
    assert result["error"] is None, result["error"]
    checkpoint = Path(case["megatron"])
    record = json.loads((checkpoint / "wit_megatron.json").read_text())
    record["arch"]["qk_layernorm"] = False
    (checkpoint / "wit_megatron.json").write_text(json.dumps(record))
    capsys.readouterr()  # transformers' save progress
    for args in ([], ["--dry-run"]):
        assert cli_module.megatron_to_hf(["--megatron", str(checkpoint), "--out", str(tmp_path / "out"), *args]) == 2
        assert capsys.readouterr().err == (
            f"error: {checkpoint / 'release'}: the checkpoint holds 2 tensor(s) the recorded architecture has no place for: "
            "decoder.layers.self_attention.k_layernorm.weight, decoder.layers.self_attention.q_layernorm.weight "
            "(its record describes a different model?)\n")
    assert not (tmp_path / "out").exists()


def test_megatron_checkpoint_without_its_record_or_hf_config(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, checkpoint)
    record = json.loads((checkpoint / "wit_megatron.json").read_text())
    (checkpoint / "wit_megatron.json").write_text(json.dumps(dict(record, hf_config=None)))
    assert refused_by_cli(capsys, "megatron_to_hf", "--megatron", str(checkpoint), "--out", str(tmp_path / "out")) == (
        f"{checkpoint / 'wit_megatron.json'}: the architecture record has no hf_config, the HF config.json that export "
        "writes; was the checkpoint converted from a Hugging Face model?")
    (checkpoint / "wit_megatron.json").write_text("{")
    assert refused_by_cli(capsys, "megatron_to_hf", "--megatron", str(checkpoint), "--out", str(tmp_path / "out")).startswith(
        f"{checkpoint / 'wit_megatron.json'}: unreadable architecture record (")
    # Without wit_megatron.json the record in the common state serves; without that too, nothing does.
    (checkpoint / "wit_megatron.json").unlink()
    assert cli_module.megatron_to_hf(["--megatron", str(checkpoint), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "-> model.layers.3.mlp.down_proj.weight [32, 48] (copy)" in capsys.readouterr().out
    # Without the record anywhere, the Megatron-LM args in the common state describe the model (as they do
    # Megatron-LM's own saves: docs/convert.md); without those either, nothing does.
    common = torch.load(checkpoint / "release/common.pt", weights_only=False)
    del common["wit_megatron"]
    torch.save(common, checkpoint / "release/common.pt")
    assert cli_module.megatron_to_hf(["--megatron", str(checkpoint), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "-> model.layers.3.mlp.down_proj.weight [32, 48] (copy)" in capsys.readouterr().out
    del common["args"]
    torch.save(common, checkpoint / "release/common.pt")
    assert refused_by_cli(capsys, "megatron_to_hf", "--megatron", str(checkpoint), "--out", str(tmp_path / "out")) == (
        f"{checkpoint / 'release'}: no wit_megatron record, no Megatron-LM args in its common state and no "
        "run_config.yaml: nothing says which model it holds; give --hf-config DIR (the model's Hugging Face config.json, "
        "or its directory, e.g. the one it was converted from): the export takes the missing settings from it and "
        "checks every other one, and every tensor shape, against the checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_export_refuses_an_existing_output_and_prints_a_dry_run(tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("old")
    refused = cli("convert_megatron_to_hf.py", "--megatron", str(CHECKPOINT), "--out", str(existing))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == f"error: output directory {existing} exists; pass --force to replace it"
    assert [p.name for p in existing.iterdir()] == ["keep"]

    assert cli_module.megatron_to_hf(["--megatron", str(CHECKPOINT), "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    mapping = capsys.readouterr().out.splitlines()
    assert len(mapping) == 1 + 4 * 6 + 1  # embedding, 6 Megatron tensors per layer, final norm (tied: no output layer)
    assert mapping[0] == "embedding.word_embeddings.weight [100, 32] -> model.embed_tokens.weight [100, 32] (vocab pad)"
    assert ("decoder.layers.self_attention.linear_qkv.weight[3] [64, 32] -> model.layers.3.self_attn.q_proj.weight "
            "[32, 32] + model.layers.3.self_attn.k_proj.weight [16, 32] + model.layers.3.self_attn.v_proj.weight "
            "[16, 32] (qkv interleave)") in mapping
    assert ("decoder.layers.mlp.linear_fc1.weight[0] [96, 32] -> model.layers.0.mlp.gate_proj.weight [48, 32] + "
            "model.layers.0.mlp.up_proj.weight [48, 32] (gate|up concat)") in mapping
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # nothing written, no temporary directory


def test_export_failure_leaves_nothing_and_force_replaces_only_when_complete(tmp_path, monkeypatch):
    from wit_megatron.convert import mcore_to_hf

    written = []

    def fail_after_configs(root, tmp, *args):
        real_write_configs(root, tmp, *args)
        written.extend(sorted(p.name for p in tmp.iterdir()))
        raise OSError("disk full")

    real_write_configs = mcore_to_hf._write_configs
    monkeypatch.setattr(mcore_to_hf, "_write_configs", fail_after_configs)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_megatron_to_hf(CHECKPOINT, out, progress=False)
    # It failed with the whole model written to the temporary directory; none of it is left.
    assert written == ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"]
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    convert_megatron_to_hf(CHECKPOINT, out, progress=False)  # an earlier export, which --force may replace
    (out / "README.md").write_text("old")  # the user's note next to it: replaced along with it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(mcore_to_hf, "_write_configs", fail_after_configs)
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        convert_megatron_to_hf(CHECKPOINT, out, force=True, progress=False)
    assert written and [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or moved-aside directory left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    monkeypatch.undo()
    assert cli_module.megatron_to_hf(["--megatron", str(CHECKPOINT), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == written
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_puts_the_old_output_back_if_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    """The old output is moved aside before the new one is renamed into place; that rename failing
    left it stranded in the moved-aside directory."""
    from wit_megatron import output

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real_rename = output.os.rename

    def rename(src, dst):
        if Path(dst) == out and ".out.wit-staging-" in Path(src).name:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with output.atomic_output_dir(out, True, [], output.OutputKind("test output", lambda path: True)) as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or moved-aside directory left
    assert [p.name for p in out.iterdir()] == ["keep"] and (out / "keep").read_text() == "old"


def test_a_conversion_leaves_nothing_in_the_temp_dir(tiny, tmp_path):
    """The single-process group was set up through a file store: a wit-convert-store-* file in the temp
    dir per conversion. Listed in the converting process, before its exit could remove anything."""
    temp = tmp_path / "temp"
    temp.mkdir()
    script = f"""
import os, tempfile
from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
tempfile.tempdir = {str(temp)!r}
convert_hf_to_megatron({str(tiny)!r}, {str(tmp_path / "out")!r}, progress=False)
print(sorted(os.listdir(tempfile.tempdir)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_cli_refuses_existing_output_and_prints_a_dry_run(tiny, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    refused = cli("convert_hf_to_megatron.py", "--hf", str(tiny), "--out", str(existing))
    assert refused.returncode == 2
    assert f"error: output directory {existing} exists; pass --force to replace it" in refused.stderr
    dry = cli("convert_hf_to_megatron.py", "--hf", str(tiny), "--out", str(tmp_path / "new"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("model.layers.3.self_attn.q_proj.weight [32, 32] float32 + model.layers.3.self_attn.k_proj.weight [16, 32] "
            "float32 + model.layers.3.self_attn.v_proj.weight [16, 32] float32 -> "
            "decoder.layers.self_attention.linear_qkv.weight[3] (qkv interleave)") in dry.stdout
    assert "model.embed_tokens.weight [100, 32] float32 -> embedding.word_embeddings.weight (vocab pad)" in dry.stdout
    assert not (tmp_path / "new").exists()


def test_cli_truncated_tensor_is_refused_and_force_replaces(tiny, tmp_path):
    # The truncation is found while the tensors are gathered, before any output is created: that a
    # failure in the write itself leaves nothing is test_failure_in_the_checkpoint_write_leaves_nothing.
    broken = edited_copy(tiny, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-64])  # the last tensor loses its tail
    out = tmp_path / "out"
    failed = cli("convert_hf_to_megatron.py", "--hf", str(broken), "--out", str(out))
    assert failed.returncode == 2 and "is truncated" in failed.stderr, failed.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temporary directory

    out.mkdir()  # stands for an earlier conversion (recognised by its record), with a file of the user's in it
    shutil.copy(CHECKPOINT / "wit_megatron.json", out)
    (out / "stale").write_text("old")
    replaced = cli("convert_hf_to_megatron.py", "--hf", str(tiny), "--out", str(out), "--force")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert not (out / "stale").exists()
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_failure_in_the_checkpoint_write_leaves_nothing(tiny, tmp_path):
    """HF -> Megatron failing after every file is written into the temporary directory (in a separate
    process: the converter sets up a process group and megatron-core's CPU layer): no --out, no
    temporary directory; over an existing output with --force, the old output is untouched."""
    old = tmp_path / "old"
    shutil.copytree(CHECKPOINT, old)  # stands for a good earlier conversion
    before = {str(p.relative_to(old)): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    jobs = [dict(hf=str(tiny), out=str(tmp_path / "new"), force=False), dict(hf=str(tiny), out=str(old), force=True)]
    results = run_distributed("tests.scenarios.convert_cases:conversions_failing_in_the_write", 1, jobs=jobs)[0]
    for job, result in zip(jobs, results):
        assert result["error"] is not None and result["error"].startswith("disk full while writing "), result
        temporary = Path(result["error"].removeprefix("disk full while writing "))
        assert temporary.parent == tmp_path and temporary.name.startswith(f".{Path(job['out']).name}.wit-staging-")
        # The whole checkpoint was there: a converter writing straight into --out would have left it.
        assert {"latest_checkpointed_iteration.txt", "wit_megatron.json", "release/.metadata", "release/common.pt",
                "release/metadata.json", "hf_assets/config.json"} <= set(result["written"]), result["written"]
        assert any(name.endswith(".distcp") for name in result["written"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no "new", no staging or moved-aside directory
    assert {str(p.relative_to(old)): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_an_interrupted_layout_write_keeps_the_previous_iteration(tmp_path, monkeypatch):
    from wit_megatron import checkpoint as ckpt
    from wit_megatron.model import GPTArch

    record = {"arch": GPTArch(vocab_size=100, num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=48, max_position_embeddings=64).to_dict()}
    (tmp_path / ckpt.TRACKER).write_text("1")
    assets = tmp_path / "assets"
    assets.mkdir()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.shutil, "copytree", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_layout(tmp_path, 2, record, assets)
    assert (tmp_path / ckpt.TRACKER).read_text() == "1"  # still the last complete iteration
    monkeypatch.undo()
    ckpt.write_layout(tmp_path, 2, record, assets)
    assert (tmp_path / ckpt.TRACKER).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
