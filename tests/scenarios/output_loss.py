"""Rank-side code of the chunked output layer's tests.

`run_layouts`: for each layout and tied/untied model, every batch goes through one training step with
Megatron's unfused output layer and one with the chunked one, on the same model (name-seeded full
weights), and, where asked, once forward-only with each (validation). The ranks compare the full gradients of their
stage themselves (collected over TP) and return only the differences, so the results stay small.

`run`: both, and training runs of the command line (tests.scenarios.training).

`run_sequence_parallel`: the chunked output layer on sequence-parallel hidden shards against
megatron-core's own ColumnParallelLinear(sequence_parallel=True) and vocab_parallel_cross_entropy
(GPTModel itself cannot run sequence-parallel on CPU: torch's norms refuse it).
"""

from __future__ import annotations

import dataclasses

import torch

from tests.scenarios.parity import ARCH, SEQ_LEN, WEIGHT_SEED
from wit_megatron.model import build_model, transformer_config
from wit_megatron.output_loss import OutputLoss, output_layer_nll
from wit_megatron.roles import RoleWeights
from wit_megatron.runtime.parallel import ParallelLayout, init_model_parallel
from wit_megatron.testing.params import gather_full_grads, load_full_tensors, seeded_weights
from wit_megatron.testing.synthetic import micro_batches, synthetic_batch, synthetic_packed_batch
from wit_megatron.training.step import forward_backward, forward_step_for, wrap_ddp

CHUNK_SIZE = 7  # tokens: several chunks per micro-batch, the last one ragged
IMPLS = {"unfused": OutputLoss("unfused"), "chunked": OutputLoss("chunked", CHUNK_SIZE)}


def make_batch(spec: dict) -> dict[str, torch.Tensor]:
    weights = RoleWeights(*spec["lambdas"])
    if spec.get("packed"):
        return synthetic_packed_batch(spec["num_seqs"], SEQ_LEN, ARCH.vocab_size, weights, seed=spec["seed"])
    return synthetic_batch(spec["num_seqs"], SEQ_LEN, ARCH.vocab_size, weights, seed=spec["seed"],
                           prompt_only=spec.get("prompt_only", ()))


def _step(model, data: dict, micro_batch_size: int, output_loss: OutputLoss, forward_only: bool) -> dict:
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = data["tokens"].shape[0] // dp
    reads = ps.get_tensor_model_parallel_rank() == 0
    iterators = [micro_batches(data, dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch_size) if reads else None
                 for _ in model]
    with torch.set_grad_enabled(not forward_only):
        return forward_backward(model, iterators, per_rank // micro_batch_size, micro_batch_size, SEQ_LEN,
                                forward_only=forward_only, forward_step_func=forward_step_for(output_loss))


def _grad_differences(reference: dict, other: dict) -> dict[str, tuple[float, float]]:
    """name -> (max |other - reference|, max |reference|), NaN-aware."""
    return {name: ((other[name] - g).abs().max().item() if torch.isfinite(other[name]).all() else float("nan"),
                   g.abs().max().item()) for name, g in reference.items()}


def _tied_aware(full_tensor, tied: bool):
    """With tied embeddings a last stage's output_layer.weight is a copy of the first stage's embedding."""
    if not tied:
        return full_tensor
    return lambda name, shape: full_tensor("embedding.word_embeddings.weight" if name == "output_layer.weight" else name, shape)


def run_layouts(models: list[dict], micro_batch_size: int) -> list[dict]:
    """models: {"layout": (tp, pp[, vpp]), "tied": bool, "batches": [batch spec], "chunk_size": optional};
    a batch spec with "validate" also runs forward-only."""
    from megatron.core import parallel_state as ps

    out = []
    for spec in models:
        parallel = ParallelLayout(*spec["layout"])
        init_model_parallel(parallel)
        arch = dataclasses.replace(ARCH, tie_embeddings=spec["tied"])
        config = transformer_config(arch, parallel)
        chunks = build_model(arch, config)
        load_full_tensors(chunks, _tied_aware(seeded_weights(WEIGHT_SEED), spec["tied"]))
        model = wrap_ddp(chunks, config)
        keep = ps.get_data_parallel_rank() == 0  # TP ranks hold the same full gradients once gathered
        for batch in spec["batches"]:
            data = make_batch(batch)
            case = {"layout": f"{parallel} dp{ps.get_data_parallel_world_size()}", "tied": spec["tied"], "batch": batch}
            grads = {}
            impls = dict(IMPLS, chunked=OutputLoss("chunked", spec.get("chunk_size", CHUNK_SIZE)))
            for name, impl in impls.items():
                case[name] = _step(model, data, micro_batch_size, impl, forward_only=False)
                grads[name] = gather_full_grads(model)
                if batch.get("validate"):
                    case[name + " valid"] = _step(model, data, micro_batch_size, impl, forward_only=True)
            case["grads"] = _grad_differences(grads["unfused"], grads["chunked"]) if keep else None
            out.append(case)
    return out


def run_sequence_parallel(tp: int, seq: int, micro_batch_size: int, vocab: int, hidden: int) -> dict:
    """One rank's view: NLL and the gradients of its hidden shard and output-weight shard, both ways."""
    from megatron.core import ModelParallelConfig, parallel_state as ps, tensor_parallel

    init_model_parallel(ParallelLayout(tp))
    rank = ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(11)
    full_hidden = torch.randn(seq, micro_batch_size, hidden, generator=gen)
    full_weight = 0.3 * torch.randn(vocab, hidden, generator=gen)
    labels = torch.randint(0, vocab, (micro_batch_size, seq), generator=gen)
    weights = torch.rand(micro_batch_size, seq, generator=gen) * (torch.rand(micro_batch_size, seq, generator=gen) < 0.6)
    select = weights != 0
    config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False)
    layer = tensor_parallel.ColumnParallelLinear(hidden, vocab, config=config, init_method=torch.nn.init.zeros_,
                                                 bias=False, gather_output=False)
    results = {}
    for impl in ("unfused", "chunked"):
        with torch.no_grad():
            layer.weight.copy_(full_weight.chunk(tp)[rank])
        layer.weight.grad = None
        shard = full_hidden.chunk(tp)[rank].clone().requires_grad_()
        if impl == "unfused":
            logits, _ = layer(shard)
            nll = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        else:
            nll = output_layer_nll(shard, layer.weight, labels, select, chunk_size=5, sequence_parallel=True,
                                   tp_group=ps.get_tensor_model_parallel_group())
        loss = torch.where(select, nll * weights, 0.0).sum()
        loss.backward()
        results[impl] = {"nll": torch.where(select, nll, 0.0).detach(), "hidden grad": shard.grad.clone(),
                         "weight grad": layer.weight.grad.clone()}
    return results


def run(models: list[dict], micro_batch_size: int, sequence_parallel: list[int], training_jobs: list[dict]) -> dict:
    """All scenarios in one launch; `training_jobs` go to tests.scenarios.training.runs (the command line)."""
    from tests.scenarios.training import runs

    return {"layouts": run_layouts(models, micro_batch_size),
            "sequence parallel": {tp: run_sequence_parallel(tp, seq=12, micro_batch_size=2, vocab=40, hidden=16)
                                  for tp in sequence_parallel},
            "training": runs(training_jobs)}
