"""Process groups and seeds for one parallel layout (tensor, pipeline, virtual pipeline, context, data)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from wit_megatron.runtime import cpu


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes. Data parallelism takes the rest of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # model chunks per pipeline rank (interleaved schedule); None = off
    cp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        return world_size // model_parallel

    def __str__(self) -> str:
        s = f"tp{self.tp}pp{self.pp}"
        if self.vpp:
            s += f"vpp{self.vpp}"
        if self.cp > 1:
            s += f"cp{self.cp}"
        return s


def init_distributed(timeout_s: int = 300) -> None:
    """Process start-up: torch.distributed from the torchrun environment (one process without it), NCCL
    on GPUs, gloo with the CPU layer otherwise."""
    if torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        cpu.enable()
        backend = "gloo"
    if "RANK" not in os.environ:  # started without a launcher: a group of one, no rendezvous
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                             timeout=timedelta(seconds=timeout_s))
        return
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def init_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """(Re)build Megatron's process groups for `layout` and seed every RNG like Megatron-LM does."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        # megatron-core forgets its groups but does not destroy them: each gloo group keeps its threads
        # (a launch switching layouts a dozen times held ~1900 threads per rank). Destroy the groups this
        # rank is in (megatron-core's list of them; None stands for the default group).
        groups = [group for group in parallel_state._global_process_group_list or [] if group is not None]
        parallel_state.destroy_model_parallel()
        live = torch.distributed.distributed_c10d._world.pg_map  # destroy_model_parallel destroys a few itself
        for group in groups:
            if group in live:
                torch.distributed.destroy_process_group(group)
        del groups
        gc.collect()  # a group's threads end when its last reference (models of the old layout, in cycles) goes
    layout.data_parallel_size(torch.distributed.get_world_size())  # validates divisibility
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_single_process() -> None:
    """Process start-up of a single-process tool (the converters): a one-rank gloo group (with the CPU
    layer when there is no GPU) and Megatron's tp1pp1 groups. Refuses to run under a multi-rank launcher."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        cpu.enable()
        # An in-memory store: one process needs no rendezvous, and a file store left a file in the temp dir.
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if torch.distributed.get_world_size() != 1:
        raise RuntimeError("conversion runs in a single process; launch it without torchrun")
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() != 1 \
            or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        init_model_parallel(ParallelLayout())
