"""The torch_dist reader returns exactly the stored values, whether it reads a whole stored chunk
straight into the destination or leaves the item to DCP (partial regions, non-contiguous storage)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from wit_megatron.convert.torch_dist_reader import TorchDistReader


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on a save without a process group
def test_reads_equal_the_stored_tensors_on_both_paths(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    stored = {
        "fp32": torch.randn(6, 5, generator=generator),
        "bf16": torch.randn(4, 3, 2, generator=generator).to(torch.bfloat16),
        # A transposed view whose storage is exactly its bytes: DCP saves it with its strides, so
        # its raw bytes are not the row-major values and the direct path must not be taken.
        "transposed": torch.randn(5, 7, generator=generator).t(),
    }
    dcp_save(stored, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)

    left_to_dcp = []
    original = FileSystemReader.read_data

    def counting(self, plan, planner):
        left_to_dcp.extend(item.storage_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", counting)
    reader = TorchDistReader(tmp_path)
    assert {k: tuple(v.size) for k, v in reader.tensors.items()} == {k: tuple(v.shape) for k, v in stored.items()}

    whole = {key: torch.full(t.shape, float("nan"), dtype=t.dtype) for key, t in stored.items()}
    reader.read({key: ((0,) * buffer.dim(), buffer) for key, buffer in whole.items()})
    for key, tensor in stored.items():
        assert torch.equal(whole[key], tensor), key
    assert left_to_dcp == ["transposed"]  # the whole contiguous chunks were read directly

    left_to_dcp.clear()
    alone = torch.empty(6, 5)
    reader.read({"fp32": ((0, 0), alone)})  # every item read directly: DCP's read_data is not called
    assert torch.equal(alone, stored["fp32"]) and left_to_dcp == []

    part = torch.empty(2, 3, 2, dtype=torch.bfloat16)
    reader.read({"bf16": ((1, 0, 0), part)})
    assert torch.equal(part, stored["bf16"][1:3])
    assert left_to_dcp == ["bf16"]  # a partial region goes through DCP
