"""Vocabulary padding and the loss. With the default (no padding where every valid TP size divides the
vocabulary) Megatron's training NLL equals the HF model's cross entropy; with forced padding the zero
rows give logit 0 to the padded entries and Megatron-Core puts them into every token's softmax, as
documented in docs/convert.md. Both checkpoints round-trip to the exact HF tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.convert_models import build, safetensors_of
from wit_megatron.convert.verify import hf_logits
from wit_megatron.runtime.launch import run_distributed

VOCAB, FORCED_MULTIPLE, PADDED = 100, 64, 128
TOLERANCE = 1e-5


def test_loss_equals_hf_without_padding_and_padding_enters_the_softmax(tmp_path):
    hf = build("llama_gqa_tied", tmp_path / "hf")  # 4 heads, 2 KV heads: TP 1 and 2 divide 100
    cases = {
        "exact": dict(hf=str(hf), megatron=str(tmp_path / "exact"), back=str(tmp_path / "exact-back")),
        "padded": dict(hf=str(hf), megatron=str(tmp_path / "padded"), back=str(tmp_path / "padded-back"),
                       vocab_multiple=FORCED_MULTIPLE),
    }
    results = run_distributed("tests.scenarios.convert_cases:round_trips", 1, cases=list(cases.values()))[0]
    original = safetensors_of(hf)
    for name, case in cases.items():
        assert results.pop(0)["error"] is None, name
        back = safetensors_of(Path(case["back"]))
        assert sorted(back) == sorted(original) and all(torch.equal(back[k], v) for k, v in original.items()), name

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    jobs = [dict(checkpoint=cases[name]["megatron"], tp=2, tokens=tokens) for name in cases]
    exact, padded = run_distributed("tests.scenarios.convert_cases:next_token_nll", 2, jobs=jobs)[0]
    assert (exact["vocab_size"], padded["vocab_size"]) == (VOCAB, PADDED)
    assert not (exact["missing"] or exact["unexpected"] or padded["missing"] or padded["unexpected"])

    logits = hf_logits(hf, tokens)[:, :-1]
    labels = tokens[:, 1:]
    hf_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    assert (exact["nll"] - hf_nll).abs().max().item() <= TOLERANCE

    # Padded: 28 extra logits of 0 in the partition function of every token.
    with_padding = torch.cat([logits, logits.new_zeros(*logits.shape[:-1], PADDED - VOCAB)], dim=-1)
    expected = torch.logsumexp(with_padding, -1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert (padded["nll"] - expected).abs().max().item() <= TOLERANCE
    assert (padded["nll"] - hf_nll).min().item() > 0.01  # strictly above HF's loss on every token
