"""Run Megatron-Core on CPU over gloo: for tests and the CPU demo only.

Megatron-Core assumes CUDA in a few places. `enable()` patches exactly those, and only when no CUDA
device is present; on a GPU machine it does nothing and the normal NCCL / Transformer Engine path runs.

What is patched, and why (facts in the project notes, measured on megatron-core 0.16.1 and 0.19.2):
- `torch.cuda.current_device()` is used as an allocation device (attention buffers, TP all-gather
  outputs, pipeline receive buffers, DDP grad buffers): it returns the CPU device.
- the CUDA RNG tracker (dropout forks, `model_parallel_cuda_manual_seed`): a tracker with Megatron's
  bookkeeping over the CPU generator.
- hard-coded ``device="cuda"`` tensors (the schedules' token counters) and ``Tensor.cuda()`` (tied
  embeddings with pipeline parallelism): a torch-function mode maps them to the CPU, and drops
  ``pin_memory=True`` (host staging for a GPU copy; RoPE's context-parallel positions). The same mode
  answers ``Tensor.type()`` with the CUDA type name (``torch.cuda.FloatTensor``), because megatron's
  optimizers and gradient clipping use that string as a dtype check and assert on it.
- ``torch.cuda.synchronize()`` / stream calls in p2p communication, checkpointing and DDP (0.19), and the
  streams Megatron-LM's model set-up creates (0.19): no-ops.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def is_active() -> bool:
    """True when the CPU layer has been switched on in this process."""
    return _ENABLED


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` arguments and ``Tensor.cuda()`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):  # staging for a copy to the GPU (RoPE's context-parallel positions)
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream (and for the class itself, which code also names in annotations):
    every ordering call is already satisfied on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, _stream):
        return None

    def wait_event(self, _event):
        return None

    def synchronize(self):
        return None

    def record_event(self, _event=None):
        return None


def _make_cpu_rng_tracker():
    """Megatron's CudaRNGStatesTracker bookkeeping, with the CPU default generator as the state."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker()


def config_overrides() -> dict:
    """ModelParallelConfig fields the CPU layer needs (none when it is off).

    gloo matches point-to-point messages between two ranks in posting order; Megatron's batched p2p
    posts a pipeline stage's forward and backward messages to the same peer in an order that pairs
    them wrongly when pp=2 with a virtual pipeline (silently: the shapes agree). The unbatched path
    orders sends and receives by rank parity, which gloo matches correctly.
    """
    return {"batch_p2p_comm": False, "batch_p2p_sync": False} if _ENABLED else {}


def enable() -> bool:
    """Switch the CPU layer on if no CUDA device is available. Returns True when it is active.

    Call once per process, before building models. Idempotent.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # Checkpoint savers record the CUDA RNG state next to the CPU one.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.get_rng_state_all = lambda *a, **k: [torch.get_rng_state()]
    torch.cuda.set_rng_state_all = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _CudaToCpuMode().__enter__()  # stays on for the life of the process
    _ENABLED = True
    return True


@contextlib.contextmanager
def _one_device_visible():
    """Within: `torch.cuda.device_count()` is 1 (and `set_device` a no-op) for set-up code that gates
    CPU-capable work on seeing a CUDA device."""
    count, set_device = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda *a, **k: None)
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = count, set_device


def enable_megatron_lm() -> bool:
    """The CPU layer (`enable`) plus what Megatron-LM's own `megatron.training.pretrain()` needs on CPU;
    nothing when a CUDA device is present. Returns True when active. Call at process start-up, before
    `pretrain()`.

    - its argument check asks the GPU's architecture (`get_device_arch_version`) when TP > 1: the CPU
      answers 0 (no CUDA architecture), and `CUDA_DEVICE_MAX_CONNECTIONS=1`, which Megatron-LM then
      requires of TP launches, is set (it means nothing without GPUs);
    - `initialize_megatron` (called by `pretrain()`) asserts CUDA unless told `allow_no_cuda`, and sets
      up its model-parallel groups and model-parallel RNG seeds only when `torch.cuda.device_count() > 0`:
      pretrain() calls it with `allow_no_cuda`, and those two set-up steps (`_initialize_distributed`,
      `_set_random_seed`) run as on one visible device, after torch.distributed is started over gloo
      (NCCL, Megatron-LM's default backend, needs GPUs);
    - `pretrain()` warms up Megatron's fused kernels (`set_jit_fusion_options`) by compiling them with
      torch.compile, a GPU start-up measure that costs about a minute of inductor compilation per rank
      on CPU, for kernels a CPU run with the fusions switched off (`--no-bias-swiglu-fusion`,
      `--no-bias-dropout-fusion`) never calls: skipped.
    """
    if not enable():
        return False
    from megatron.training import arguments, initialize, training

    if getattr(initialize, "_wit_cpu", False):
        return True
    initialize_megatron = training.initialize_megatron

    def initialize_without_cuda(*args, **kwargs):
        return initialize_megatron(*args, **dict(kwargs, allow_no_cuda=True))

    initialize_distributed, set_random_seed = initialize._initialize_distributed, initialize._set_random_seed

    def initialize_distributed_over_gloo(*args, **kwargs):
        if not torch.distributed.is_initialized():
            from datetime import timedelta

            from megatron.training import get_args

            a = get_args()
            torch.distributed.init_process_group("gloo", rank=a.rank, world_size=a.world_size,
                                                 timeout=timedelta(minutes=a.distributed_timeout_minutes))
        with _one_device_visible():
            return initialize_distributed(*args, **kwargs)

    def set_random_seed_on_cpu(*args, **kwargs):
        with _one_device_visible():
            return set_random_seed(*args, **kwargs)

    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    training.initialize_megatron = initialize_without_cuda
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    initialize._initialize_distributed = initialize_distributed_over_gloo
    initialize._set_random_seed = set_random_seed_on_cpu
    initialize._wit_cpu = True
    return True
