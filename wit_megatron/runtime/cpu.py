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
- ``torch.cuda.synchronize()`` / stream calls in p2p communication, checkpointing and DDP (0.19): no-ops.
"""

from __future__ import annotations

import contextlib

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
    """Stands in for a CUDA stream: every ordering call is already satisfied on the CPU."""

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
