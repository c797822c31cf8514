"""The one place that knows how megatron-core versions differ (tested: 0.16.1 and 0.19.2)."""

from __future__ import annotations

import inspect
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
