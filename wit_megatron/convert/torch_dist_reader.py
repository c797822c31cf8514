"""Read rectangular regions of tensors from a torch_dist checkpoint, in one process.

megatron-core's `dist_checkpointing.load` of a partial request (one layer of a stacked
`decoder.layers.*` tensor) needs the other layers' fragments to be owned by another rank, which a
single process cannot express. The files are PyTorch Distributed Checkpoint (DCP) files keyed by
megatron-core's ShardedTensor keys, so the exporter asks DCP directly for exactly the region it
wants (it reads only the overlapping stored chunks) into a buffer it owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from wit_megatron.convert.transforms import ConversionError


def tensor_metadata(directory: Path) -> dict[str, TensorStorageMetadata]:
    """Checkpoint key -> stored global size, dtype and chunks (tensors only)."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


class _RegionPlanner(DefaultLoadPlanner):
    """Plans reads of `requests` = {key: (global offsets, destination buffer)} and nothing else."""

    def __init__(self, requests: dict[str, tuple[Sequence[int], torch.Tensor]]):
        super().__init__()
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, (offsets, buffer) in self.requests.items():
            stored = self.metadata.state_dict_metadata.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                raise ConversionError(f"checkpoint has no tensor {key}")
            region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, stored, [region])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        buffer = self.requests[read_item.dest_index.fqn][1]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buffer = buffer.narrow(dim, offset, length)
        return buffer

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # the reader copied into a view of the caller's buffer


def read_regions(directory: Path, requests: dict[str, tuple[Sequence[int], torch.Tensor]]) -> None:
    """Fill each buffer with the region of its key starting at the given global offsets."""
    dcp_load(
        state_dict={key: buffer for key, (_, buffer) in requests.items()},
        storage_reader=FileSystemReader(str(directory)),
        planner=_RegionPlanner(requests),
        no_dist=True,
    )
