"""The real SmolLM2-135M-Instruct (9 heads, 3 KV heads, tied embeddings; TP 1 or 3) converts HF ->
Megatron -> HF bit-identically, and at tp3pp2 (6 ranks) and tp1pp2 the converted checkpoint gives
transformers' fp32 logits to 1e-4 on prompts from its real tokenizer."""

from __future__ import annotations

import torch

from tests.convert_models import safetensors_of
from wit_megatron.convert.verify import default_tokens, hf_logits
from wit_megatron.runtime.launch import run_distributed
from wit_megatron.testing.smollm2 import smollm2_dir, tokenizer_dir


def test_smollm2_round_trip_and_logits(tmp_path):
    from transformers import AutoTokenizer

    hf = smollm2_dir()
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    (result,) = run_distributed("tests.scenarios.convert_cases:round_trips", 1,
                                cases=[dict(hf=str(hf), megatron=str(megatron), back=str(back))])[0]
    assert result["error"] is None, result["error"]

    original, exported = safetensors_of(hf), safetensors_of(back)
    assert sorted(exported) == sorted(original)
    assert all(exported[k].dtype == v.dtype and torch.equal(exported[k], v) for k, v in original.items())
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(back)(prompt)["input_ids"] == AutoTokenizer.from_pretrained(hf)(prompt)["input_ids"]

    tokens = default_tokens(49152, tokenizer_dir=tokenizer_dir())
    assert tokens.shape[1] >= 5
    layouts = [(3, 2, None), (1, 2, None)]
    per_rank = run_distributed("tests.scenarios.convert_cases:logits", 6,
                               jobs=[dict(checkpoint=str(megatron), layout=l, tokens=tokens) for l in layouts])
    reference = hf_logits(hf, tokens)
    for i, layout in enumerate(layouts):
        assert all(not r[i]["missing"] and not r[i]["unexpected"] for r in per_rank), per_rank[0][i]
        (logits,) = [r[i]["logits"] for r in per_rank if r[i]["logits"] is not None]
        diff = (logits - reference).abs().max().item()
        assert diff <= 1e-4, (layout, diff)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), layout


def test_smollm2_exported_as_a_checkpoint_written_elsewhere(tmp_path):
    """The converted SmolLM2 without our record (as Megatron-LM or another tool would hold it: only the
    Megatron-LM args, which name its tokenizer directory as Megatron-LM does): export gives the original
    weights bitwise, and the config.json written from the args has the original sizes and its tokenizer's
    bos/eos/pad ids (which generation reads from there)."""
    import json
    import shutil

    from transformers import AutoConfig

    from tests.test_convert_foreign import convert, export, foreign_copy

    hf = smollm2_dir()
    converted = convert(hf, tmp_path / "converted")
    args = torch.load(converted / "release" / "common.pt", weights_only=False)["args"]
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", str((converted / "hf_assets").resolve()))
    assert args.make_vocab_size_divisible_by == 1 and args.padded_vocab_size == 49152
    foreign = foreign_copy(converted, tmp_path / "foreign", {"args": args, "iteration": 0})
    shutil.copytree(converted / "hf_assets", foreign / "hf_assets")
    done = export(foreign, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    original, exported = safetensors_of(hf), safetensors_of(tmp_path / "out")
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], v) for k, v in original.items())
    want, got = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(tmp_path / "out")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(got, key) == getattr(want, key), key
    assert json.loads((tmp_path / "out/config.json").read_text())["rope_parameters"]["rope_theta"] == 100000.0
