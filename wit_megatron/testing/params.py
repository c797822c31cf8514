"""Map a rank's parameter shards to layout-independent full tensors, and back.

A parameter's full name is its name in a single-rank model (`decoder.layers.<global index>...`); its
full tensor concatenates the tensor-parallel shards along `partition_dim`, except the gated MLP's
`linear_fc1` ([gate; up] at every TP size), whose shards are [gate_r; up_r]. With these, weights can be
loaded identically into every parallel layout and gradients compared across layouts.
"""

from __future__ import annotations

import re
import zlib
from typing import Callable, Iterator, Sequence

import torch

from wit_megatron.model import unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _local_name(name: str) -> str:
    for te, local in _TE_TO_LOCAL.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def named_full_params(chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(full name, local parameter) for every parameter of this rank's model chunks.

    Full names use the local layer spec's naming, also for a Transformer Engine model.
    Marks gated-MLP fc1 parameters with `_wit_glu = True` (see the module docstring)."""
    for chunk in chunks:
        model = unwrap(chunk)
        layers = getattr(getattr(model, "decoder", None), "layers", None)
        offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
        gated = model.config.gated_linear_unit
        for name, param in model.named_parameters():
            param._wit_glu = gated and ".mlp.linear_fc1." in name and not name.endswith("layer_norm_weight")
            yield _local_name(_LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)), param


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp()[1]
    return tuple(shape)


def load_full_tensors(chunks: Sequence[torch.nn.Module], full_tensor: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """Set every parameter to this rank's shard of `full_tensor(full name, full shape)`."""
    rank, size, _ = _tp()
    with torch.no_grad():
        for name, param in named_full_params(chunks):
            full = full_tensor(name, full_shape(param))
            if getattr(param, "tensor_model_parallel", False):
                full = _shard(full, param, rank, size)
            param.copy_(full)


def _shard(full: torch.Tensor, param, rank: int, size: int) -> torch.Tensor:
    if param._wit_glu:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
    return full.chunk(size, dim=param.partition_dim)[rank]


def _unshard(parts: list[torch.Tensor], param) -> torch.Tensor:
    if param._wit_glu:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=param.partition_dim)


def seeded_weights(seed: int) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    """Deterministic full tensors keyed by name: N(0, 0.05²) for matrices, 1 + N(0, 0.1²) for norms."""

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.randn(shape, generator=gen)
        return 1.0 + 0.1 * values if len(shape) == 1 else 0.05 * values

    return make


def gather_full_grads(chunks: Sequence[torch.nn.Module], attr: str = "main_grad") -> dict[str, torch.Tensor]:
    """Full-name -> full gradient of this rank's pipeline stage (a collective over the TP group)."""
    rank, size, group = _tp()
    out = {}
    for name, param in named_full_params(chunks):
        grad = getattr(param, attr).detach().float().clone()
        if size > 1 and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(size)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            grad = _unshard(parts, param)
        out[name] = grad
    return out
