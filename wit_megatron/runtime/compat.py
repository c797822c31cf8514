"""The one place that knows how megatron-core versions differ (tested: 0.16.1 and 0.19.2)."""

from __future__ import annotations

import contextlib
import inspect
import queue
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch


@lru_cache(maxsize=None)
def megatron_core_version() -> tuple[int, ...]:
    from megatron.core.package_info import __version__
    from packaging.version import Version

    return Version(__version__).release  # "0.19.2+17ab756" -> (0, 19, 2)


def slice_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron's load-balanced CP slicing (2×CP chunks; rank r keeps chunks r and 2·CP-1-r).

    `batch` must hold only tensors with a sequence dimension (dim 1; dim 2 for 'attention_mask').
    0.19 added an `is_hybrid_cp` argument and takes the CP group explicitly.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(dict(batch), cp_group=group)


def save_distributed_checkpoint(sharded_state_dict: dict, directory, writers: Optional[int] = None) -> None:
    """`dist_checkpointing.save` in the torch_dist format, readable by megatron-core 0.16 and later.

    `writers`: files (and writer processes) per rank, megatron-core's `thread_count` (its default
    when None: 2 in 0.16, 1 in 0.19). The save is synchronous, so the write results are passed
    through an in-process queue (see `_in_process_write_results`).

    0.17+ keeps the common (non-tensor) state inside the checkpoint files and writes no `common.pt`,
    which 0.16 requires; 0.17+ still prefers a `common.pt` when present. So after a 0.17+ save,
    rank 0 writes the same common state to `common.pt` as well.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    strategy = get_default_save_sharded_strategy()
    if writers is not None:
        strategy.thread_count = writers
    with _in_process_write_results():
        dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=strategy)
    if megatron_core_version() >= (0, 17) and torch.distributed.get_rank() == 0:
        common = dist_checkpointing.load_common_state_dict(str(directory))
        torch.save(common, Path(directory) / "common.pt")  # 0.16's COMMON_STATE_FNAME
    torch.distributed.barrier()


@contextlib.contextmanager
def _in_process_write_results() -> Iterator[None]:
    """The torch_dist writer hands its write results from the writing function to `finalize` through
    a module-level queue that it creates as a spawn-context `Manager().Queue()` (0.16 and 0.19 alike):
    starting that manager launches a fresh interpreter (~1 s here) and it must be shut down again
    (~0.6 s; left running it outlives ranks that end with os._exit and holds their output pipes).
    In a synchronous save both ends run in this process, so a plain queue does the same job."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


@lru_cache(maxsize=None)
def blended_dataset_caches_without_process_group() -> bool:
    """Whether BlendedDataset can cache its indices (config.path_to_cache set) in a process without
    torch.distributed. 0.16 calls `torch.distributed.get_rank()` unguarded there and raises; 0.19
    checks `is_initialized()` first. Decided from the code itself, not a version number."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    return "is_initialized" in inspect.getsource(BlendedDataset._build_indices)
