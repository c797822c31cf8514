"""Real data and a tiny real-vocabulary model for the training tests (tests/test_training_run.py,
tests/test_megatron_lm_pretrain.py), and the independent transformers-side reference of their losses.

`build_training_data` writes HumanEval (167 records) and its first 24 records, preprocessed with SmolLM2's
tokenizer, and a tiny random Llama with SmolLM2's vocabulary and tokenizer, as HF and converted;
tests/conftest.py builds it once per test session (the `training_data` fixture).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.convert_models import randomize
from tests.test_data_preprocess import humaneval, write_jsonl
from wit_megatron.data.preprocess import PreprocessConfig, run as preprocess
from wit_megatron.testing import smollm2

ROOT = Path(__file__).resolve().parents[1]


def convert(hf: Path, out: Path) -> Path:
    run = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(out),
                          "--layer-spec", "local"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def build_training_data(tmp: Path) -> dict:
    """{"tmp", "he", "he24" (dataset prefixes), "tiny_hf" (HF directory), "tiny" (converted checkpoint)}."""
    import transformers

    records = humaneval()
    prefixes = {}
    for name, subset in (("he", records), ("he24", records[:24])):
        prefixes[name] = str(tmp / name / name)
        preprocess(PreprocessConfig([write_jsonl(tmp / f"{name}.jsonl", subset)], prefixes[name], str(smollm2.tokenizer_dir()),
                                    max_length=257, progress=False), tokenizer=smollm2.load_tokenizer())
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, seed=7)
    tiny_hf = tmp / "tiny-hf"
    model.save_pretrained(tiny_hf)
    smollm2.load_tokenizer().save_pretrained(tiny_hf)
    return {"tmp": tmp, **prefixes, "tiny_hf": tiny_hf, "tiny": convert(tiny_hf, tmp / "tiny-megatron")}


def datasets_of(argv: list[str], world_size: int):
    """The train and validation datasets a run with `argv` reads (built here, in this process, from the
    same options: the index caches are the run's)."""
    from wit_megatron.data.loader import build_datasets
    from wit_megatron.training import loop
    from wit_megatron.training.arguments import parse_args

    args = parse_args(argv, world_size=world_size)
    gbs = args.global_batch_size
    return build_datasets(loop._data_config(args), args.train_iters * gbs if args.train_iters else None, None, True)


def hf_reference(hf_dir: Path, samples: list[dict], grad_norm: bool = False) -> dict:
    """The paper's terms from transformers' logits (float64 log-softmax), record by record: a packed
    sample's records each run alone at their own positions. Returns loss and count per report key, and
    with `grad_norm` the norm of the gradient of Σ w·NLL / N (a tied embedding counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    sums = {"lm loss": [0.0, 0], "prompt nll": [0.0, 0], "response nll": [0.0, 0]}
    weighted = []
    with torch.set_grad_enabled(grad_norm):
        for sample in samples:
            docs = sample.get("document_ids")
            segments = [torch.arange(len(sample["tokens"]))] if docs is None else \
                [torch.nonzero(docs == d).flatten() for d in docs.unique() if d >= 0]
            for idx in segments:
                logits = model(input_ids=sample["tokens"][idx][None], position_ids=sample["position_ids"][idx][None]).logits[0]
                nll = torch.nn.functional.cross_entropy(logits.double(), sample["labels"][idx], reduction="none")
                mask = sample["loss_mask"][idx].bool()
                weight = sample["loss_weights"][idx].double() * mask
                response = sample["response_mask"][idx] & mask
                weighted.append((weight * nll).sum())
                for key, sel, term in (("lm loss", weight != 0, weight * nll), ("prompt nll", mask & ~response, nll),
                                       ("response nll", response, nll)):
                    sums[key][0] += float(term[sel].detach().sum())
                    sums[key][1] += int(sel.sum())
    out = {key: {"loss": s / n, "count": n} for key, (s, n) in sums.items()}
    if grad_norm:
        (sum(weighted) / sums["lm loss"][1]).backward()
        out["grad norm"] = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    return out
