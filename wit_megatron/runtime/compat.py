"""The one place that knows how megatron-core versions differ (tested: 0.16.1 and 0.19.2)."""

from __future__ import annotations

import contextlib
import functools
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


# megatron-core's wheel ships Megatron-LM's `megatron.training` from this version on (0.16.1's does not).
MEGATRON_TRAINING_SINCE = (0, 17)


def ships_megatron_training() -> bool:
    """Whether this megatron-core's wheel ships `megatron.training`. Decided by the version, not by trying
    the import: where the wheel ships it, a failing import is a broken install and must be seen."""
    return megatron_core_version() >= MEGATRON_TRAINING_SINCE


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


def mlp_submodules(mlp_spec):
    """The MLPSubmodules (linear_fc1, linear_fc2) of a GPT layer spec's `mlp` entry, to edit in place:
    0.16 gives a ModuleSpec(module=MLP, submodules=...), 0.19 `partial(MLP.as_mlp_submodule, submodules=...)`."""
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords["submodules"]
    return mlp_spec.submodules


def save_distributed_checkpoint(sharded_state_dict: dict, directory, writers: Optional[int] = None,
                                content_metadata: Optional[dict] = None) -> None:
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
        dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=strategy, content_metadata=content_metadata)
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


def megatron_lm_saves_results_in_process() -> None:
    """Megatron-LM's synchronous checkpoint saves (no --async-save) pass their write results in process,
    as `save_distributed_checkpoint` does (see `_in_process_write_results`): otherwise every rank's first
    save starts a spawn-context manager, a fresh interpreter that imports the launch script and
    Megatron-LM again (47 s of a 4-rank CPU run's first save here, 0.25 s for its second). Idempotent."""
    from megatron.training import checkpointing, get_args, training

    save = checkpointing.save_checkpoint
    if getattr(save, "_wit_in_process", False):
        return

    def save_checkpoint(*args, **kwargs):
        if get_args().async_save:  # the writer runs in another process: it needs the manager's queue
            return save(*args, **kwargs)
        with _in_process_write_results():
            return save(*args, **kwargs)

    save_checkpoint._wit_in_process = True
    checkpointing.save_checkpoint = training.save_checkpoint = save_checkpoint


def use_prebuilt_dataset_helpers() -> None:
    """Let Megatron-LM's `initialize_megatron` use megatron-core's prebuilt C++ dataset helpers.

    It builds them at start-up with `make` in megatron/core/datasets, which holds a Makefile in a
    Megatron-LM source tree; megatron-core's wheel ships the built `helpers_cpp` module and no Makefile,
    so `make` fails and Megatron-LM exits. Where the module imports and there is no Makefile, the build
    is skipped (its barrier kept). Decided from the files, not a version number; idempotent."""
    import importlib.util

    from megatron.training import initialize

    helpers = importlib.util.find_spec("megatron.core.datasets.helpers_cpp")
    if helpers is None or (Path(helpers.origin).parent / "Makefile").exists():
        return
    initialize._compile_dependencies = lambda: torch.distributed.barrier()


def pretraining_sampler(total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                        data_parallel_size: int):
    """Megatron-LM's MegatronPretrainingSampler: from `consumed_samples` on, every `micro_batch_size x
    data_parallel_size` consecutive sample indices form one micro-batch per data-parallel rank, and
    this rank takes its slice. The wheel ships it in `megatron.training` from 0.17 on; 0.16 gets the
    same iteration here."""
    if not ships_megatron_training():  # megatron-core 0.16
        return _PretrainingSampler(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    return MegatronPretrainingSampler(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)


class _PretrainingSampler:
    """megatron.training's MegatronPretrainingSampler (drop_last=True), for megatron-core 0.16."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int):
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"no samples left to consume: {consumed_samples} of {total_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.start = data_parallel_rank * micro_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self):
        step = self.micro_batch_times_data_parallel_size
        for first in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(first + self.start, first + self.start + self.micro_batch_size))


def prepare_optimizer_for_loading(optimizer) -> None:
    """Make a distributed optimizer loadable when neither Apex nor Transformer Engine (fused Adam) is
    installed, as on CPU, where it runs torch's Adam. Two megatron-core paths assume fused Adam there:
    - `sharded_state_dict(is_loading=True)` reads the inner optimizer's per-parameter 'step' and asserts
      there is one, which holds only after a first step: megatron-core's own dummy-value initialisation
      (a zero-gradient step) creates it, and the load replaces every value it wrote, main params included;
    - the fully reshardable format restores 'step' from the param groups and carries no per-parameter
      'step', but copying a parameter's state back expects one for every state tensor torch's Adam
      holds: the copy leaves 'step' as the param groups set it.
    Call `finish_optimizer_loading` after the optimizer's `load_state_dict`."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    if not getattr(cls, "_wit_step_kept", False):
        copy_states = cls._set_main_param_and_optimizer_states

        def set_states(self, model_param, tensors):
            if "step" not in tensors:
                group_index, group_order = self.model_param_group_index_map[model_param]
                state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
                if "step" in state:
                    tensors = dict(tensors, step=state["step"])
            return copy_states(self, model_param, tensors)

        cls._set_main_param_and_optimizer_states = set_states
        cls._wit_step_kept = True
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, cls) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def finish_optimizer_loading(optimizer) -> None:
    """After a distributed optimizer's `load_state_dict` without fused Adam (see
    `prepare_optimizer_for_loading`): megatron-core gives every parameter's state the same 'step'
    tensor, which torch's Adam then increments in place once per parameter and step, so the bias
    correction of every later step would be wrong. Each parameter gets its own copy."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, distrib_optimizer.DistributedOptimizer):
            for state in inner.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def gpt_forward_with_output_processor(model: torch.nn.Module, processor, *args, **kwargs):
    """`model(*args, **kwargs)` of a GPTModel (possibly wrapped) whose last stage returns
    `processor(hidden_states=, output_layer=, output_weight=, labels=, ...)` instead of its logits or
    per-token losses; `output_weight` is the shared embedding weight when tied, else None.

    0.19 has this hook (`output_processor`). 0.16 has not: there the call goes through `_postprocess`,
    the step the hook replaces (same hidden states, after the final norm), overridden for this call only.
    """
    from megatron.core.models.gpt import GPTModel

    if "output_processor" in inspect.signature(GPTModel.forward).parameters:
        return model(*args, output_processor=processor, **kwargs)

    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if inner.config.mtp_num_layers:  # 0.16 runs MTP inside _postprocess
        raise ValueError("multi-token prediction is not supported by the output processor on megatron-core 0.16")

    def postprocess(*, hidden_states, labels, **_):
        output_weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
        return processor(hidden_states=hidden_states, output_layer=inner.output_layer, output_weight=output_weight,
                         labels=labels)

    inner._postprocess = postprocess  # an instance attribute shadows the method for this call
    try:
        return model(*args, **kwargs)
    finally:
        del inner._postprocess
