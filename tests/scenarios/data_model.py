"""Rank-side code of the data-through-the-model tests: a tiny GPT with SmolLM2's vocabulary reads a
WITDataset built (on every rank, through megatron-core's builder) from preprocessed HumanEval.

`run` does, in one launch:
  1. one global batch of packed samples through get_batch / forward_backward at each of `layouts` (4
     ranks: tp2pp2 at dp1, tp2 at dp2), returning the report and the full gradients of each stage;
  2. the single-process reference for that batch (rank 0, tp1pp1): full logits, float64 log-softmax,
     its own block-diagonal mask, Σ w·NLL / N, and its gradients;
  3. packed vs unpacked (rank 0): per-token NLL of each record of packed samples vs the same record
     alone in an unpacked sample.
"""

from __future__ import annotations

import torch

from wit_megatron.data.dataset import WITDatasetConfig, build_datasets
from wit_megatron.model import GPTArch, build_model, transformer_config
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.params import gather_full_grads, load_full_tensors, named_full_params, seeded_weights
from wit_megatron.training.step import forward_backward, wrap_ddp

ARCH = GPTArch(
    vocab_size=49152, num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=128, max_position_embeddings=512,
)
WEIGHT_SEED = 11
LAMBDAS = (0.3, 0.9)


def datasets(prefix: str, cache: str, seq_length: int, packing: bool):
    config = WITDatasetConfig(
        random_seed=5, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        role_weights=RoleWeights(*LAMBDAS), packing=packing, path_to_cache=cache,
    )
    return build_datasets(config, [None, None, None])[0]


def tiny_model(layout: ParallelLayout, dtype: torch.dtype = torch.float32):
    """Model chunks for this rank at `layout` (process groups already initialised for it)."""
    config = transformer_config(ARCH, layout, dtype=dtype)
    chunks = build_model(ARCH, config)
    load_full_tensors(chunks, seeded_weights(WEIGHT_SEED))
    return chunks, config


def collate(dataset, indices) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def most_packed(packed, count: int) -> list[int]:
    """The `count` samples holding the most records (ties: lower index first)."""
    records = [int(packed[i]["document_ids"].max()) + 1 for i in range(len(packed))]
    return sorted(range(len(packed)), key=lambda i: (-records[i], i))[:count]


def parallel_step(train, chosen: list[int], layout: tuple, seq_length: int, mbs: int) -> dict:
    """The global batch `chosen` at `layout` (tp, pp), split over the data-parallel ranks: the report and
    this stage's full gradients (on TP rank 0 of DP rank 0; None elsewhere)."""
    from megatron.core import parallel_state as ps

    layout = ParallelLayout(*layout)
    init_model_parallel(layout)
    chunks, config = tiny_model(layout)
    model = wrap_ddp(chunks, config)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = chosen[dp_rank * len(chosen) // dp : (dp_rank + 1) * len(chosen) // dp]
    batches = [collate(train, mine[m : m + mbs]) for m in range(0, len(mine), mbs)]
    tp_rank = ps.get_tensor_model_parallel_rank()
    iterators = [iter(batches) if tp_rank == 0 else None for _ in model]
    report = forward_backward(model, iterators, len(batches), mbs, seq_length)
    grads = gather_full_grads(model)
    return {"layout": str(layout), "report": report, "grads": grads if tp_rank == 0 and dp_rank == 0 else None}


def reference(train, chosen: list[int]) -> dict:
    """Loss and gradients of Σ w·NLL / N over the batch, one sample's backward at a time (the float64
    log-softmax over 49,152 logits per token would otherwise hold ~1 GB)."""
    (model,), _ = tiny_model(ParallelLayout())
    batch = collate(train, chosen)
    doc = batch["document_ids"]
    s = doc.shape[1]
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    w = batch["loss_weights"].double()
    n = int((w != 0).sum())
    loss = 0.0
    for i in range(len(chosen)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        part = (w[i : i + 1] * token_nll(model, one, ~allowed[i : i + 1, None])).sum() / n
        part.backward()
        loss += part.item()
    grads = {name: p.grad.float().clone() for name, p in named_full_params([model])}
    return {"loss": loss, "n": n, "records": int(doc.max(dim=1).values.add(1).sum()), "grads": grads}


def token_nll(model, batch: dict, attention_mask) -> torch.Tensor:
    """[b, s] NLL of each target from the model's logits, log-softmax in float64 (Megatron's own
    per-token loss casts logits to float32, which would hide a float64 model's precision)."""
    logits = model(batch["tokens"], batch["position_ids"], attention_mask)
    return -torch.log_softmax(logits.double(), -1).gather(-1, batch["labels"][..., None])[..., 0]


def packed_vs_unpacked(packed, unpacked, chosen: list[int], dtype: torch.dtype) -> list[dict]:
    from wit_megatron.batch import packed_attention_mask

    (model,), _ = tiny_model(ParallelLayout(), dtype)
    by_tokens = {}
    for i in range(len(unpacked)):
        sample = unpacked[i]
        n = int(sample["loss_mask"].sum())
        by_tokens[tuple(sample["tokens"][:n].tolist())] = i
    out = []
    with torch.no_grad():
        for p in chosen:
            batch = collate(packed, [p])
            nll = token_nll(model, batch, packed_attention_mask(batch["document_ids"]))[0]
            for d in range(int(batch["document_ids"].max()) + 1):
                seg = batch["document_ids"][0] == d
                alone = collate(unpacked, [by_tokens[tuple(batch["tokens"][0][seg].tolist())]])
                nll_alone = token_nll(model, alone, None)[0][: int(seg.sum())]
                out.append({"packed": nll[seg].clone(), "unpacked": nll_alone.clone(), "offset": int(seg.nonzero()[0])})
    return out


def run(prefix: str, cache: str, seq_length: int, layouts: list[tuple], mbs: list[int], samples: int,
        compare_samples: int) -> dict:
    # Dataset building is a collective (rank 0 builds and caches first): every rank builds both.
    packed = datasets(prefix, cache, seq_length, packing=True)
    unpacked = datasets(prefix, cache, seq_length, packing=False)
    chosen = most_packed(packed, max(samples, compare_samples))
    out = {"steps": [parallel_step(packed, chosen[:samples], layout, seq_length, m) for layout, m in zip(layouts, mbs)],
           "reference": None, "packing": None}
    init_model_parallel(ParallelLayout())  # a collective too
    if torch.distributed.get_rank() == 0:
        out["reference"] = reference(packed, chosen[:samples])
        out["packing"] = {str(dtype).removeprefix("torch."): packed_vs_unpacked(packed, unpacked, chosen[:compare_samples], dtype)
                          for dtype in (torch.float32, torch.float64)}
    torch.distributed.barrier()
    return out
