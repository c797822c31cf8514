"""Read rectangular regions of tensors from a torch_dist checkpoint, in one process.

megatron-core's `dist_checkpointing.load` of a partial request (one layer of a stacked
`decoder.layers.*` tensor) needs the other layers' fragments to be owned by another rank, which a
single process cannot express. The files are PyTorch Distributed Checkpoint (DCP) files keyed by
megatron-core's ShardedTensor keys, so the exporter asks DCP directly for exactly the regions it
wants (it reads only the overlapping stored chunks) into buffers it owns. Nothing here imports
megatron-core.
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

Requests = dict[str, tuple[Sequence[int], torch.Tensor]]  # key -> (global offsets, destination buffer)


class TorchDistReader(FileSystemReader):
    """A FileSystemReader that unpickles the checkpoint's `.metadata` once: DCP asks for it on every
    load, and it is the largest per-call cost when a model is read a layer at a time."""

    def __init__(self, directory: Path):
        super().__init__(str(directory))
        self._metadata = super().read_metadata()

    def read_metadata(self, *args, **kwargs):
        return self._metadata

    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Checkpoint key -> stored global size, dtype and chunks (tensors only)."""
        return {k: v for k, v in self._metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def read(self, requests: Requests) -> None:
        """Fill each buffer with the region of its key starting at the given global offsets, in one DCP load."""
        dcp_load(
            state_dict={key: buffer for key, (_, buffer) in requests.items()},
            storage_reader=self,
            planner=_RegionPlanner(requests),
            no_dist=True,
        )


class _RegionPlanner(DefaultLoadPlanner):
    """Plans reads of exactly the requested regions and nothing else."""

    def __init__(self, requests: Requests):
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
