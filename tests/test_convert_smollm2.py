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
