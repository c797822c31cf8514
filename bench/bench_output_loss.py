"""Peak memory and time of the loss step (output layer + cross entropy + WIT weighting, forward and
backward) at Llama-3's vocabulary (128,256) and hidden size 4096, on CPU, tp1:

    python bench/bench_output_loss.py [--tokens 1024] [--chunk-sizes 64 1024] [--rounds 2]

    unfused   megatron-core's output layer (ColumnParallelLinear) and vocab_parallel_cross_entropy on
              every position, then wit_loss: what `--wit-loss-impl unfused` runs
    chunked   wit_megatron.output_loss.output_layer_nll on the targets of non-zero weight, N tokens at a
              time (one row per --chunk-sizes N), then wit_loss: what `--wit-loss-impl chunked` runs
    CCE       Apple's Cut Cross-Entropy (PyPI cut-cross-entropy), its torch_compile implementation (the
              one that runs without a GPU), reduction="none" with zero-weight targets passed as its
              ignore index (so it skips them too), then the same weighting

The micro-batch holds real token ids and roles: records packed into --tokens targets in corpus order,
tokenized with Meta's Llama-3 tokenizer, from HumanEval (the WIT paper's prompt/response format) and
from a real chat set (the chitchat-dataset package's human conversations, the two speakers as user
and assistant in Llama-3's chat template). Their response fractions set how much the chunked path
skips at λ_p = 0. Hidden states and weights are random (their values do not change the cost).

Two launches. Memory (one round): the growth of the process's peak RSS (VmHWM, reset before each step)
over its RSS before the step, with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the
RSS at once. Both paths produce the weight gradient ([vocab, hidden] float32, 2 GiB here), which
Megatron accumulates into the parameter's main_grad; the "beyond the weight gradient" column leaves it
out. Time (--rounds rounds, each running every case once in turn, so that drift hits all alike; the
median): with glibc keeping freed memory for reuse (no mmap, no trimming), as PyTorch's caching
allocator does on a GPU. With memory returned at once, every step pays the kernel for faulting in a
fresh 2 GiB weight gradient, on both paths alike: on this VM from 1 to 12 s of system time per step,
which swamps what the paths compute (the memory launch's times, one round, are printed beside them).

Two chunk sizes, because this CPU cannot run a production-sized micro-batch at this vocabulary in
minutes. Memory: the transient logits scale with chunk / tokens, and 64 of 1024 is the ratio of the
default chunk (1024) at 16k tokens per micro-batch. Time: every chunk streams the whole 2 GiB weight
(and, backward, its gradient) through the CPU's memory, so a 64-row matmul is bandwidth-bound here,
while the default chunk of 1024 (one chunk at these selections, its softmax kept) runs at full speed;
on GPUs the default 1024-token chunk is compute-bound.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN = 128_256, 4096
CHAT_CONVERSATIONS = 500  # the first conversations of chitchat-dataset measured for the chat fraction


def paper_records() -> list[dict]:
    from tests.test_data_preprocess import humaneval

    return humaneval()


def chat_records(limit: int) -> list[dict]:
    """chitchat-dataset's first `limit` conversations as chats: the first speaker as user, the other as
    assistant, a speaker's consecutive messages as one turn."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None:
        raise SystemExit("the chat set needs the chitchat-dataset package: pip install --no-deps chitchat-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset.json"
    conversations = json.loads(path.read_text())
    records = []
    for conversation in list(conversations.values())[:limit]:
        turns = conversation["messages"]
        first = turns[0][0]["sender"]
        messages = [{"role": "user" if turn[0]["sender"] == first else "assistant",
                     "content": "\n".join(m["text"] for m in turn)} for turn in turns]
        if len(messages) > 1:  # a few conversations have one speaker only: no response to train on
            records.append({"messages": messages})
    return records


def encoded_corpora() -> dict[str, list]:
    """name -> Encoded records (ids and per-token roles) with the Llama-3 tokenizer."""
    from tests.test_data_chat import LLAMA3_TEMPLATE
    from wit_megatron.data.formats import parse_record
    from wit_megatron.data.tokenize import ChatEncoder, PaperEncoder
    from wit_megatron.testing import llama3

    tokenizer = llama3.load_tokenizer()
    paper = PaperEncoder(tokenizer).encode_batch([parse_record(r) for r in paper_records()])
    chat_encoder = ChatEncoder(tokenizer, LLAMA3_TEMPLATE)
    chat = [chat_encoder.encode(parse_record(r)) for r in chat_records(CHAT_CONVERSATIONS)]
    return {"HumanEval": [e for e in paper if hasattr(e, "ids")], "chitchat": chat}


def response_fraction(records) -> float:
    """Response targets / all targets (targets are ids[1:], each with its own role)."""
    from wit_megatron.roles import Role

    response = sum(int((e.roles[1:] == int(Role.RESPONSE)).sum()) for e in records)
    return response / sum(len(e) - 1 for e in records)


def packed_targets(records, tokens: int):
    """(labels, roles) of the first `tokens` targets of the records packed in order."""
    import numpy as np

    labels, roles = [], []
    for e in records:
        labels.append(e.ids[1:])
        roles.append(e.roles[1:])
        if sum(len(x) for x in labels) >= tokens:
            break
    return np.concatenate(labels)[:tokens], np.concatenate(roles)[:tokens]


def _memory_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def measure(batches: dict, tokens: int, chunk_sizes: list[int], rounds: int, cce: bool, vocab: int, hidden_size: int,
            threads: int, keep_freed_memory: bool) -> dict:
    import torch
    from megatron.core import ModelParallelConfig, tensor_parallel

    from wit_megatron.loss import wit_loss
    from wit_megatron.output_loss import output_layer_nll
    from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel

    libc = ctypes.CDLL("libc.so.6")
    if keep_freed_memory:  # the time launch: freed tensors stay in the heap and are reused without page faults
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is not given back
    else:  # the memory launch
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed tensors go back to the system at once
    torch.set_num_threads(threads)  # the launcher gives each rank one thread; this one rank gets the machine's
    init_model_parallel(ParallelLayout())
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(vocab, hidden_size).normal_(0, 0.02, generator=gen).requires_grad_()
    hidden = torch.randn(tokens, 1, hidden_size, generator=gen).requires_grad_()  # [s, b, h] as the decoder's output
    config = ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False)
    output_layer = tensor_parallel.ColumnParallelLinear(hidden_size, vocab, config=config, init_method=None, bias=False,
                                                        skip_weight_param_allocation=True)  # the tied-weight form

    def unfused(b):
        logits, _ = output_layer(hidden, weight=weight)
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits, b["labels"].t().contiguous()).t()
        return wit_loss(nll, b["weights"], b["mask"], b["response"], check=False)[0]

    def chunked(chunk_size):
        def step(b):
            select = b["weights"] != 0
            nll = output_layer_nll(hidden, weight, b["labels"], select, chunk_size)
            return wit_loss(nll, b["weights"], select, b["response"], check=False)[0]

        return step

    def cut_cross_entropy(b):
        from cut_cross_entropy import linear_cross_entropy

        targets = torch.where(b["weights"] != 0, b["labels"], -100)[0]
        nll = linear_cross_entropy(hidden[:, 0], weight, targets, reduction="none", impl="torch_compile")
        return wit_loss(nll[None], b["weights"], b["weights"] != 0, b["response"], check=False)[0]

    cases = [("unfused", "HumanEval", unfused)]
    for name in batches:
        cases += [(f"chunked {size}", name, chunked(size)) for size in chunk_sizes]
        if cce:
            cases.append(("CCE", name, cut_cross_entropy))
    if cce:  # compile, untimed, on two sizes of weighted targets: the graphs are then dynamic in the size
        hidden_all = hidden
        for size in (16, 24):
            few = {k: v[:, :size] for k, v in batches["HumanEval"].items()}
            few["weights"] = (torch.arange(size) % 2).float()[None]  # some targets ignored, as in the real batches
            hidden = hidden_all[:size].detach().requires_grad_()
            cut_cross_entropy(few).backward()
        hidden = hidden_all
    weight_grad_mib = weight.numel() * weight.element_size() / 2**20
    results = {(impl, name): {"seconds": [], "peak MiB": 0.0} for impl, name, _ in cases}
    for _ in range(rounds):
        for impl, name, fn in cases:
            weight.grad = hidden.grad = None
            before, _ = _memory_kib()
            _reset_peak()
            began = time.perf_counter()
            fn(batches[name]).backward()
            seconds = time.perf_counter() - began
            _, peak = _memory_kib()
            r = results[(impl, name)]
            r["seconds"].append(seconds)
            r["peak MiB"] = max(r["peak MiB"], (peak - before) / 1024)
    weight.grad = hidden.grad = None
    return {"results": results, "weight grad MiB": weight_grad_mib, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="targets in the micro-batch (default 1024)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 1024],
                   help="chunked: tokens per chunk, one row each (default 64 1024: see the module docstring)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds; the median is reported (default 2)")
    p.add_argument("--lambda-prompt", type=float, default=0.0, help="λ_p (default 0: the conventional setting)")
    p.add_argument("--lambda-response", type=float, default=1.0)
    p.add_argument("--no-cce", action="store_true", help="leave Cut Cross-Entropy out")
    p.add_argument("--vocab", type=int, default=VOCAB, help="smaller for a quick check (token ids taken modulo it)")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    args = p.parse_args()

    import torch

    from wit_megatron.roles import Role, RoleWeights
    from wit_megatron.runtime.launch import run_distributed

    cce = not args.no_cce and importlib.util.find_spec("cut_cross_entropy") is not None
    if not args.no_cce and not cce:
        print("Cut Cross-Entropy is not installed (pip install cut-cross-entropy): its rows are left out")
    table = RoleWeights(args.lambda_prompt, args.lambda_response).table()
    corpora = encoded_corpora()
    batches, fractions = {}, {}
    for name, records in corpora.items():
        labels, roles = packed_targets(records, args.tokens)
        roles = torch.from_numpy(roles).long()[None]
        batches[name] = {"labels": torch.from_numpy(labels).long()[None] % args.vocab, "weights": table[roles],
                         "mask": torch.ones(1, args.tokens), "response": roles == int(Role.RESPONSE)}
        fractions[name] = (response_fraction(records), float((table[roles] != 0).float().mean()))
    began = time.perf_counter()
    common = dict(batches=batches, tokens=args.tokens, chunk_sizes=args.chunk_sizes, cce=cce, vocab=args.vocab,
                  hidden_size=args.hidden, threads=torch.get_num_threads())
    memory = run_distributed("bench.bench_output_loss:measure", 1, timeout_s=3600, rounds=1, keep_freed_memory=False,
                             **common)[0]
    out = run_distributed("bench.bench_output_loss:measure", 1, timeout_s=3600, rounds=args.rounds, keep_freed_memory=True,
                          **common)[0]
    wall = time.perf_counter() - began
    results, grad_mib = out["results"], memory["weight grad MiB"]

    print(f"\nloss step, forward + backward: vocab {args.vocab:,}, hidden {args.hidden}, {args.tokens} tokens, tp1, float32, "
          f"λ = ({args.lambda_prompt}, {args.lambda_response}), "
          f"torch {torch.__version__}, {out['threads']} threads; {wall:.0f} s")
    for name, (corpus, batch) in fractions.items():
        print(f"  {name}: response fraction {corpus:.3f} of the corpus's targets (Llama-3 tokenizer), "
              f"{batch:.3f} of this micro-batch's targets have non-zero weight")
    base_s = statistics.median(results[("unfused", "HumanEval")]["seconds"])
    base_mib = memory["results"][("unfused", "HumanEval")]["peak MiB"]
    base_returning_s = memory["results"][("unfused", "HumanEval")]["seconds"][0]
    print(f"\n{'case':26s} {'time s':>8s} {'/ unfused':>9s} {'non-zero':>8s} {'peak MiB':>9s} {'/ unfused':>9s}"
          f" {'beyond W grad':>13s} {'/ unfused':>9s} {'time s, memory returned':>23s} {'/ unfused':>9s}")
    for key, r in results.items():
        impl, name = key
        seconds, m = statistics.median(r["seconds"]), memory["results"][key]
        label, nonzero = ("unfused", "") if impl == "unfused" else (f"{impl}, {name}", f"{fractions[name][1]:.3f}")
        beyond = m["peak MiB"] - grad_mib
        print(f"{label:26s} {seconds:8.2f} {seconds / base_s:9.3f} {nonzero:>8s} {m['peak MiB']:9.0f} "
              f"{m['peak MiB'] / base_mib:9.3f} {beyond:13.0f} {beyond / (base_mib - grad_mib):9.3f} "
              f"{m['seconds'][0]:23.2f} {m['seconds'][0] / base_returning_s:9.3f}")
    print(f"\nunfused computes every position: its cost is the same for both data sets. non-zero: the micro-batch's "
          f"fraction of targets with non-zero weight (what chunked and CCE compute). beyond W grad: the peak less the "
          f"{grad_mib:.0f} MiB weight gradient that every path produces. time s: median of {args.rounds} rounds, freed "
          f"memory kept for reuse; time s, memory returned: the memory launch's one round, each step faulting in its "
          f"memory afresh. Goals for chunked: time / unfused <= 1.1 x non-zero; beyond W grad / unfused <= 0.10.")


if __name__ == "__main__":
    main()
