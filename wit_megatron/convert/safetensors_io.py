"""Read and write safetensors one tensor at a time.

The reader parses each file's header once and gives each tensor over a private memory map of exactly
its bytes, so nothing is read until used and an unchanged tensor is read by whoever writes it. The writer
knows every tensor's name, dtype and shape before the first byte (the converter plans them from the
checkpoint's metadata), writes each shard's header first and then the bytes as tensors arrive, so a
shard is never assembled in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy
import torch

from wit_megatron.convert.transforms import ConversionError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
# In the `__metadata__` of every shard the exporter writes: what marks a directory as this tool's output,
# the only kind `wit-convert-megatron-to-hf --force` replaces (transformers keeps "format": "pt" only).
EXPORT_MARK = {"format": "pt", "written_by": "wit-megatron"}
# The writer flushes its shard to disk every this many bytes: dirty pages stay bounded however large
# the model (an unbounded backlog throttles the writer and crowds out the page cache).
SYNC_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor infos and the `__metadata__` of one safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ConversionError(f"{path}: corrupt safetensors header (it claims {length} bytes, the file has {size})")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:  # invalid JSON or UTF-8
            raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for tensor {name}: {entry!r}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ConversionError(
                f"{path}: tensor {name} has unsupported dtype {dtype} (supported: {', '.join(DTYPES)})"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)) \
                or end - begin != PlannedTensor(name, DTYPES[dtype], shape).nbytes:
            raise ConversionError(
                f"{path}: corrupt safetensors header entry for tensor {name}: shape {list(shape)} {dtype} "
                f"does not fit data_offsets {[begin, end]}"
            )
        infos[name] = TensorInfo(path, DTYPES[dtype], shape, 8 + length + begin, 8 + length + end)
    return infos, metadata


def written_by_export(directory: Path) -> bool:
    """Whether `directory` is an HF model the exporter wrote: config.json, and safetensors shards that
    all carry EXPORT_MARK."""
    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    if not (directory / "config.json").is_file() or not shards:
        return False
    try:
        return all(read_header(shard)[1].get("written_by") == EXPORT_MARK["written_by"] for shard in shards)
    except ConversionError:
        return False


class SafetensorsReader:
    """All tensors of an HF model directory (`model.safetensors` or a sharded index), read on demand."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / INDEX
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{index}: unreadable index, expected a JSON object with a weight_map "
                                      f"({type(e).__name__}: {e})") from None
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else "no such directory"
            raise ConversionError(f"{directory}: no safetensors weights (found: {found})")
        self.infos: dict[str, TensorInfo] = {}
        for name in files:
            self.infos.update(read_header(directory / name)[0])

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        """The tensor over a private, copy-on-write memory map of its bytes: pages are read on first
        touch (by whoever touches them first: the checkpoint writer's processes, when the converter
        hands the tensor on unchanged), and the storage is exactly the tensor (torch.save writes no more)."""
        info = self.infos[name]
        if info.file.stat().st_size < info.end:
            raise ConversionError(f"{info.file}: tensor {name} is truncated")
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        mapped = numpy.memmap(info.file, dtype=numpy.uint8, mode="c", offset=info.begin, shape=(info.end - info.begin,))
        return torch.from_numpy(mapped).view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class StreamingSafetensorsWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_bytes` (one tensor
    larger than that gets a shard of its own) plus `model.safetensors.index.json`."""

    def __init__(self, directory: Path, plan: Sequence[PlannedTensor], max_shard_bytes: int):
        self.directory = Path(directory)
        self.plan = list(plan)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in self.plan:
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(tensor)
            size += tensor.nbytes
        self.shards = shards
        count = len(shards)
        self.file_names = (
            ["model.safetensors"] if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._next = 0
        self._shard = -1
        self._file = None
        self._left_in_shard = 0
        self._unsynced = 0

    def _open_next_shard(self) -> None:
        self._shard += 1
        header, offset = {}, 0
        for tensor in self.shards[self._shard]:
            header[tensor.name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        header["__metadata__"] = dict(EXPORT_MARK)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.directory / self.file_names[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._left_in_shard = len(self.shards[self._shard])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.plan[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
            raise ConversionError(
                f"internal: produced {name} {tensor.dtype} {tuple(tensor.shape)} but planned "
                f"{expected.name} {expected.dtype} {expected.shape}"
            )
        if self._left_in_shard == 0:
            self._open_next_shard()
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._unsynced += tensor.nbytes
        if self._unsynced >= SYNC_BYTES:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        if self._next != len(self.plan):
            raise ConversionError(f"internal: {len(self.plan) - self._next} planned tensors were never written")
        weight_map = {t.name: self.file_names[s] for s, shard in enumerate(self.shards) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
