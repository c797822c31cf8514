"""The one place that knows how megatron-core versions differ (tested: 0.16.1 and 0.19.2)."""

from __future__ import annotations

import inspect
from pathlib import Path
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def megatron_core_version() -> tuple[int, ...]:
    from megatron.core.package_info import __version__

    return tuple(int(p) for p in __version__.split(".")[:3] if p.isdigit())


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


def save_distributed_checkpoint(sharded_state_dict: dict, directory) -> None:
    """`dist_checkpointing.save` in the torch_dist format, readable by megatron-core 0.16 and later.

    0.17+ keeps the common (non-tensor) state inside the checkpoint files and writes no `common.pt`,
    which 0.16 requires; 0.17+ still prefers a `common.pt` when present. So after a 0.17+ save,
    rank 0 writes the same common state to `common.pt` as well.
    """
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(directory))
    _stop_writer_results_manager()
    if megatron_core_version() >= (0, 17) and torch.distributed.get_rank() == 0:
        common = dist_checkpointing.load_common_state_dict(str(directory))
        torch.save(common, Path(directory) / "common.pt")  # 0.16's COMMON_STATE_FNAME
    torch.distributed.barrier()


@lru_cache(maxsize=None)
def blended_dataset_caches_without_process_group() -> bool:
    """Whether BlendedDataset can cache its indices (config.path_to_cache set) in a process without
    torch.distributed. 0.16 calls `torch.distributed.get_rank()` unguarded there and raises; 0.19
    checks `is_initialized()` first. Decided from the code itself, not a version number."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    return "is_initialized" in inspect.getsource(BlendedDataset._build_indices)


def _stop_writer_results_manager() -> None:
    """Shut down the spawn-context Manager process the torch_dist writer caches for its results queue
    (0.16 and 0.19 alike). Left running, it outlives a rank that ends with os._exit (forked test
    ranks) and holds its parent's output pipes open; the next save starts a fresh one."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = getattr(getattr(filesystem_async, "_results_queue", None), "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None
