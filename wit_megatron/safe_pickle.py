"""What the pickles of a checkpoint may refer to: the one admission list, and the checks that hold them to it.

A torch_dist checkpoint is full of pickles, and the libraries that read them run whatever a pickle
names: torch DCP's `FileSystemReader` loads `.metadata` with plain `pickle.load`; its load planner
loads every non-tensor item of the `.distcp` files (megatron-core 0.17+'s common state, RNG states,
optimizer objects) with `torch.load(weights_only=False)`; `common.pt` goes through `torch.load` with
torch's default. A checkpoint downloaded from elsewhere must therefore be checked before any library
reads it (`checkpoint.check_files` does, wherever a checkpoint is opened).

A pickle passes if every global it names (GLOBAL / STACK_GLOBAL / INST / EXT opcodes, and torch's
storage records) is in `ADMITTED`. The check runs the pickle's opcodes with every admitted global
replaced by an inert stand-in, so nothing of the checkpoint is constructed or called while it is
checked; `loads` then unpickles the same bytes (never re-read from disk). The list admits exactly
what legitimate checkpoints hold (measured on each writer's output, see the groups); a checkpoint
naming anything else is refused with the name, and a writer that needs more is added here, in one
place, with the reason.
"""

from __future__ import annotations

import io
import pickle
import zipfile

# group (why it is needed) -> "module.name" of every global that group's checkpoints pickle.
ADMITTED: dict[str, tuple[str, ...]] = {
    # torch DCP's `.metadata` (torch 2.4 to 2.13): the storage layout of every tensor and object, and
    # the save plans megatron-core keeps in it (to reuse them in the next save).
    "torch DCP metadata": (
        "torch.distributed.checkpoint.metadata.Metadata", "torch.distributed.checkpoint.metadata.MetadataIndex",
        "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
        "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
        "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
        "torch.distributed.checkpoint.metadata.TensorProperties", "torch.distributed.checkpoint.metadata.StorageMeta",
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.distributed.checkpoint.planner.SavePlan", "torch.distributed.checkpoint.planner.WriteItem",
        "torch.distributed.checkpoint.planner.WriteItemType", "torch.distributed.checkpoint.planner.TensorWriteData",
        "torch.distributed.checkpoint.planner.BytesIOWriteData", "torch.serialization._get_layout", "torch.Size",
    ),
    # torch.save's records of tensors (RNG states, tensors in the common state); torch's dtypes and
    # storage classes are admitted by name below (`_torch_names`).
    "torch tensors": ("torch._utils._rebuild_tensor_v2", "collections.OrderedDict"),
    # numpy's RNG state (np.random.get_state(): a uint32 array), numpy 1 and 2 names.
    "numpy RNG state": (
        "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
        "numpy.dtypes.UInt32DType", "_codecs.encode",
    ),
    # Megatron-LM's `args` (an argparse.Namespace; this project's saves hold one too) and the values its
    # fields take, and the rerun state machine's state (Megatron-LM and Megatron-Bridge saves): exactly
    # megatron-core's SAFE_GLOBALS (megatron/core/safe_globals.py, 0.16.1 and 0.19.2), which megatron-core
    # registers with torch for the same loads.
    "Megatron-LM and Megatron-Bridge state": (
        "argparse.Namespace", "types.SimpleNamespace", "pathlib.PosixPath", "signal.Signals", "io.BytesIO",
        "torch._C.Generator", "megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
        "megatron.core.transformer.enums.CudaGraphScope", "megatron.core.transformer.enums.CudaGraphModule",
        "megatron.core.transformer.enums.InferenceCudaGraphScope",
        "megatron.core.optimizer.optimizer_config.OptimizerConfig",
        "megatron.core.rerun_state_machine.RerunDiagnostic", "megatron.core.rerun_state_machine.RerunMode",
        "megatron.core.rerun_state_machine.RerunState",
    ),
}
# Measured writers (every global their pickles name, 2026-12): wit-convert-hf-to-megatron and training saves
# (plain and distributed optimizer) under megatron-core 0.16.1 and 0.19.2, and Megatron-LM 0.19.2's
# `save_checkpoint` (with and without an Adam optimizer). Tests that keep them admitted: every test that
# exports, verifies or resumes a checkpoint of this project (all of them pass these checks first), and
# tests/test_convert_megatron_lm.py for Megatron-LM's save. Megatron-Bridge 0.6's saves hold the same
# common state as Megatron-LM's less `args` (its `generate_state_dict`: checkpoint version, iteration,
# model, optimizer, scheduler, rerun state, RNG state), plus train_state.pt (tensors), checked like common.pt.


def _torch_names() -> frozenset[tuple[str, str]]:
    """torch's dtypes and storage classes, pickled by name ("torch.float32", "torch.FloatStorage")."""
    import torch

    return frozenset(("torch", name) for name in dir(torch)
                     if isinstance(getattr(torch, name), torch.dtype) or name.endswith("Storage"))


def admitted() -> frozenset[tuple[str, str]]:
    return frozenset(tuple(entry.rsplit(".", 1)) for entries in ADMITTED.values() for entry in entries) | _torch_names()


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names a global outside `ADMITTED`, or that is not a pickle (or torch.save archive) at all.
    The message is a predicate ("refers to os.system, ..."): the caller names the file or object."""


class _Inert:
    """Stands in for every admitted global while a pickle is checked: accepts every construction,
    state and item the pickle gives it, and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Checker(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: frozenset, persistent_ids: bool):
        super().__init__(io.BytesIO(data))
        self.allowed, self.persistent_ids = allowed, persistent_ids

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise RefusedPickle(f"refers to {module}.{name}, which no checkpoint holds (refused without running it)")
        return _Inert

    def persistent_load(self, pid):
        if not self.persistent_ids:  # a plain pickle has no storage records
            raise RefusedPickle("holds a persistent reference, which a plain pickle of checkpoint metadata never does")
        return _Inert()


def check(data: bytes, persistent_ids: bool = False) -> None:
    """Raise RefusedPickle unless `data` is one pickle that names only admitted globals."""
    try:
        _Checker(data, admitted(), persistent_ids).load()
    except RefusedPickle:
        raise
    except Exception as e:  # truncated or not a pickle at all: refused just the same
        raise RefusedPickle(f"is not a readable pickle ({type(e).__name__}: {e})") from None


def loads(data: bytes):
    """Unpickle `data` after `check`: a plain pickle of admitted globals only (DCP's `.metadata`)."""
    check(data)
    return pickle.loads(data)


def check_torch_save(data: bytes) -> None:
    """Raise RefusedPickle unless `data` is a torch.save archive whose pickles name only admitted globals
    (its tensor bytes are not pickles and are not read)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        # Every member entry, by its own record: an archive may hold two entries of one name.
        pickles = [info for info in archive.infolist() if info.filename.endswith(".pkl")]
        if not pickles:
            raise RefusedPickle("is a zip archive without a pickle, not a torch.save file")
        for info in pickles:
            check(archive.read(info), persistent_ids=True)
    except zipfile.BadZipFile:
        # torch.save has written zip archives since torch 1.6; the legacy format is a chain of pickles
        # followed by raw bytes, which nothing writing torch_dist checkpoints produces.
        raise RefusedPickle("is not a torch.save archive (not a zip file)") from None
