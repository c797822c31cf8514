"""megatron-core's checkpoint structure without a real model: what the HF -> Megatron writer fills.

A single-rank GPTModel built on the meta device gives megatron-core's own sharded_state_dict (keys,
global shapes, stacked layers, factories) without allocating a byte; the converter hands each entry
its HF tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch, build_model, transformer_config
from wit_megatron.runtime.parallel import ParallelLayout


def meta_model(arch: GPTArch, dtype: torch.dtype):
    """A single-rank GPTModel on the meta device. Local layer spec: its checkpoint keys are
    Transformer Engine's (see `families`)."""
    config = transformer_config(arch, ParallelLayout(), dtype, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        (model,) = build_model(arch, config, kind="local")
    return model


def tensor_entries(sharded_state_dict: dict) -> Iterator[tuple[str, str, Optional[int], object]]:
    """(state-dict name, checkpoint key, layer or None, ShardedTensor or ShardedTensorFactory) of a
    single-rank model's sharded_state_dict; `_extra_state` objects are skipped."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    for name, sharded in sharded_state_dict.items():
        if isinstance(sharded, ShardedObject):
            continue
        layer = None
        if sharded.key.startswith("decoder.layers."):
            if isinstance(sharded, ShardedTensorFactory):  # name: decoder.layers.<i>.mlp.linear_fc1.weight
                layer = int(name.split(".")[2])
            else:
                layer = sharded.global_offset[0]
        yield name, sharded.key, layer, sharded


def with_data(sharded, tensor: torch.Tensor):
    """A copy of a meta ShardedTensor/Factory holding `tensor` (shape checked by megatron-core)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(sharded, ShardedTensor):
        if tuple(tensor.shape) != tuple(sharded.local_shape):
            raise ConversionError(f"{sharded.key}: shape {tuple(tensor.shape)}, Megatron expects {tuple(sharded.local_shape)}")
        return dataclasses.replace(sharded, data=tensor, dtype=tensor.dtype)
    if tuple(tensor.shape) != tuple(sharded.data.shape):
        raise ConversionError(f"{sharded.key}: shape {tuple(tensor.shape)}, Megatron expects {tuple(sharded.data.shape)}")
    return dataclasses.replace(sharded, data=tensor)
