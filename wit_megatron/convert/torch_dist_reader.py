"""Read rectangular regions of tensors from a torch_dist checkpoint, in one process.

megatron-core's `dist_checkpointing.load` of a partial request (one layer of a stacked
`decoder.layers.*` tensor) needs the other layers' fragments to be owned by another rank, which a
single process cannot express. The files are PyTorch Distributed Checkpoint (DCP) files keyed by
megatron-core's ShardedTensor keys, so the exporter asks DCP directly for exactly the regions it
wants (it reads only the overlapping stored chunks) into buffers it owns. Nothing here imports
megatron-core.

DCP reads a stored chunk (a `torch.save` zip) into a byte buffer, unpickles it into a new tensor
and copies that into the destination: three passes over every byte. When a whole stored chunk goes
to a contiguous destination (every chunk of a converted checkpoint, most of a training one), the
reader instead finds the chunk's storage record in the zip and reads the bytes straight into the
destination; anything else goes through DCP's own path.
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.futures import Future
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from wit_megatron.convert.transforms import ConversionError

Requests = dict[str, tuple[Sequence[int], torch.Tensor]]  # key -> (global offsets, destination buffer)


class TorchDistReader(FileSystemReader):
    """A FileSystemReader that reads the checkpoint's `.metadata` once, through `checkpoint.check_files`
    (which unpickles it safely and checks that every stored item lies within its file) instead of DCP's
    plain `pickle.load`: DCP asks for it on every load, and it is the largest per-call cost when a model
    is read a layer at a time."""

    def __init__(self, directory: Path):
        from wit_megatron.checkpoint import check_files

        super().__init__(str(directory))
        self._metadata = check_files(directory)

    def read_metadata(self, *args, **kwargs):
        return self._metadata

    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Checkpoint key -> stored global size, dtype and chunks (tensors only)."""
        return {k: v for k, v in self._metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        rest = [item for item in plan.items if not self._read_whole_chunk(item, planner)]
        if rest:
            return super().read_data(LoadPlan(rest), planner)
        done = Future()
        done.set_result(None)
        return done

    def _read_whole_chunk(self, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read `item` straight from its storage record into the destination, if it is a whole
        stored chunk saved as a plain contiguous tensor and the destination is contiguous."""
        info = self.storage_data[item.storage_index]
        chunk = self._metadata.state_dict_metadata[item.storage_index.fqn].chunks[item.storage_index.index]
        target = planner.resolve_tensor(item).detach()
        if (item.type != LoadItemType.TENSOR or info.transform_descriptors or any(item.storage_offsets)
                or tuple(item.lengths) != tuple(chunk.sizes) or not target.is_contiguous()):
            return False
        with open(Path(self.path) / info.relative_path, "rb") as f:
            record = _storage_record(_FileWindow(f, info.offset, info.length), target)
            if record is None:
                return False
            f.seek(info.offset + record)
            if f.readinto(target.reshape(-1).view(torch.uint8).numpy()) != target.nbytes:
                raise ConversionError(f"{Path(self.path) / info.relative_path}: {item.storage_index.fqn} is truncated")
        planner.commit_tensor(item, target)
        return True

    def read(self, requests: Requests) -> None:
        """Fill each buffer with the region of its key starting at the given global offsets, in one DCP load."""
        try:
            with warnings.catch_warnings():  # DCP warns that a load without a process group is single-process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load(
                    state_dict={key: buffer for key, (_, buffer) in requests.items()},
                    storage_reader=self,
                    planner=_RegionPlanner(requests),
                    no_dist=True,
                )
        except (Exception, CheckpointException) as e:  # a file that broke after the checks: name what was read
            cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
            if isinstance(cause, ConversionError):
                raise cause from None
            stored = self._metadata.storage_data
            files = sorted({stored[index].relative_path for index in stored if index.fqn in requests})
            raise ConversionError(f"{self.path}: cannot read {', '.join(requests)} from {', '.join(files)} "
                                  f"({type(cause).__name__}: {cause})") from None


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


class _FileWindow(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable file (one stored DCP item)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + pos
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        n = self.f.readinto(memoryview(buffer)[:n])
        self.pos += n
        return n


STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                  "DoubleStorage": torch.float64}


class _TensorMeta(pickle.Unpickler):
    """Unpickles a `torch.save`d tensor's data.pkl into (storage dtype, storage key, storage offset,
    size, stride) without touching the storage; any other content raises UnpicklingError."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (*storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid  # ("storage", storage type, key, location, numel)
        return dtype, key


def _storage_record(window: _FileWindow, target: torch.Tensor) -> Optional[int]:
    """Offset in the window of the raw bytes of the tensor stored there, if it is exactly `target`'s
    dtype and shape, contiguous from storage offset 0, little-endian and uncompressed; else None."""
    try:
        with zipfile.ZipFile(window) as archive:
            names = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
            if "byteorder" in names and archive.read(names["byteorder"]) != b"little":
                return None
            dtype, key, offset, size, stride = _TensorMeta(io.BytesIO(archive.read(names["data.pkl"]))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, KeyError, AttributeError):
        return None
    record = names.get(f"data/{key}")
    if (record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != target.nbytes
            or dtype != target.dtype or offset != 0 or size != tuple(target.shape)
            or stride != torch.empty(size, device="meta").stride()):
        return None
    window.seek(record.header_offset)
    header = window.read(30)
    if header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return record.header_offset + 30 + name_length + extra_length
