"""Megatron-LM's checkpoint directory layout and the architecture record stored with it.

    ROOT/latest_checkpointed_iteration.txt   "release" or the iteration number
    ROOT/release/ or ROOT/iter_0000100/      a megatron-core torch_dist checkpoint (metadata.json,
                                             .metadata, *.distcp, common.pt)
    ROOT/wit_megatron.json                   this project's record: family, GPTArch, TransformerConfig
                                             fields, the HF config.json, dtype
    ROOT/megatron_lm_flags.txt                the model's Megatron-LM arguments (convert/megatron_lm.py)
    ROOT/hf_assets/                          tokenizer files and generation_config.json, copied back on export

The common state holds what Megatron-LM's `load_checkpoint` reads (`args`, `checkpoint_version`,
`iteration`) and the same record under "wit_megatron", so an iteration directory alone is enough.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from wit_megatron.convert.megatron_lm import FLAGS_FILE, megatron_lm_args, megatron_lm_flags
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch, build_model, layer_spec, transformer_config
from wit_megatron.runtime.parallel import ParallelLayout

TRACKER = "latest_checkpointed_iteration.txt"
RECORD = "wit_megatron.json"
ASSETS = "hf_assets"
RECORD_FORMAT = 1


def iteration_dir_name(iteration: Optional[int]) -> str:
    """Megatron-LM's names: `release` for a converted model, `iter_0000100` for training saves."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


def resolve(path: Path) -> tuple[Path, Path]:
    """(root, iteration directory) of a checkpoint given its root (tracker file) or an iteration dir."""
    path = Path(path)
    if (path / TRACKER).exists():
        tag = (path / TRACKER).read_text().strip()
        iteration = None if tag == "release" else int(tag)
        return path, path / iteration_dir_name(iteration)
    if (path / "metadata.json").exists():
        return path.parent, path
    raise ConversionError(
        f"{path}: not a Megatron checkpoint (no {TRACKER} and no metadata.json of a torch_dist checkpoint)"
    )


def config_fields(config) -> dict:
    """The JSON-representable fields of a TransformerConfig (dtypes as their names)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, torch.dtype):
            out[f.name] = str(value).removeprefix("torch.")
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f.name] = value
    return out


def make_record(family: str, arch: GPTArch, dtype: torch.dtype, hf_config: Optional[dict]) -> dict:
    config = transformer_config(arch, ParallelLayout(), dtype)
    return {
        "format": RECORD_FORMAT,
        "family": family,
        "dtype": str(dtype).removeprefix("torch."),
        "arch": arch.to_dict(),
        "transformer_config": config_fields(config),
        "hf_config": hf_config,
    }


def read_record(root: Path, iteration_dir: Path) -> dict:
    """The architecture record: from ROOT/wit_megatron.json, else from the checkpoint's common state."""
    if (root / RECORD).exists():
        try:
            record = json.loads((root / RECORD).read_text())
        except ValueError as e:  # invalid JSON or text
            raise ConversionError(f"{root / RECORD}: unreadable architecture record ({e})") from None
        if not isinstance(record, dict):
            raise ConversionError(f"{root / RECORD}: expected a JSON object, found {type(record).__name__}")
        return record
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iteration_dir))
    if "wit_megatron" not in common:
        raise ConversionError(
            f"{iteration_dir}: no {RECORD} next to it and no architecture record in its common state; "
            "was it written by this project's converter or training?"
        )
    return json.loads(common["wit_megatron"])


def common_state(record: dict, arch: GPTArch, dtype: torch.dtype, iteration: Optional[int],
                 layout: ParallelLayout = ParallelLayout(), world_size: int = 1) -> dict:
    return {
        "args": megatron_lm_args(arch, dtype, layout, world_size),
        "checkpoint_version": 3.0,
        "iteration": iteration or 0,
        "wit_megatron": json.dumps(record),
    }


def ensure_single_process() -> None:
    """A one-rank gloo group with Megatron's tp1pp1 groups, for converting outside a launcher."""
    from megatron.core import parallel_state

    from wit_megatron.runtime import cpu
    from wit_megatron.runtime.parallel import init_model_parallel

    if not torch.distributed.is_initialized():
        cpu.enable()
        # An in-memory store: one process needs no rendezvous, and a file store left a file in the temp dir.
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if torch.distributed.get_world_size() != 1:
        raise ConversionError("conversion runs in a single process; launch it without torchrun")
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() != 1 \
            or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        init_model_parallel(ParallelLayout())


def meta_model(arch: GPTArch, dtype: torch.dtype):
    """A single-rank GPTModel on the meta device: megatron-core's own sharded_state_dict structure
    (keys, global shapes, stacking, factories) without allocating a byte. Local layer spec: its
    checkpoint keys are Transformer Engine's (see `families`)."""
    config = transformer_config(arch, ParallelLayout(), dtype, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        (model,) = build_model(arch, config, spec=layer_spec(arch, "local"))
    return model


def tensor_entries(sharded_state_dict: dict) -> Iterator[tuple[str, str, Optional[int], object]]:
    """(state-dict name, checkpoint key, layer or None, ShardedTensor or ShardedTensorFactory) of a
    single-rank model's sharded_state_dict; `_extra_state` objects are skipped."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    for name, sharded in sharded_state_dict.items():
        if isinstance(sharded, ShardedObject):
            continue
        layer = None
        if sharded.key.startswith("decoder.layers."):
            if isinstance(sharded, ShardedTensorFactory):  # name: decoder.layers.<i>.mlp.linear_fc1.weight
                layer = int(name.split(".")[2])
            else:
                layer = sharded.global_offset[0]
        yield name, sharded.key, layer, sharded


def with_data(sharded, tensor: torch.Tensor):
    """A copy of a meta ShardedTensor/Factory holding `tensor` (shape checked by megatron-core)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(sharded, ShardedTensor):
        if tuple(tensor.shape) != tuple(sharded.local_shape):
            raise ConversionError(f"{sharded.key}: shape {tuple(tensor.shape)}, Megatron expects {tuple(sharded.local_shape)}")
        return dataclasses.replace(sharded, data=tensor, dtype=tensor.dtype)
    if tuple(tensor.shape) != tuple(sharded.data.shape):
        raise ConversionError(f"{sharded.key}: shape {tuple(tensor.shape)}, Megatron expects {tuple(sharded.data.shape)}")
    return dataclasses.replace(sharded, data=tensor)


def write_layout(root: Path, iteration: Optional[int], record: dict, assets: Optional[Path]) -> None:
    """The record, the HF assets and the tracker file around an already saved iteration directory."""
    # The tracker last: a training save interrupted before it still points at the previous
    # iteration. Each file is replaced whole, never left half-written.
    _replace_file(root / RECORD, json.dumps(record, indent=2) + "\n")
    _replace_file(root / FLAGS_FILE, " ".join(megatron_lm_flags(GPTArch.from_dict(record["arch"]))) + "\n")
    if assets is not None and assets.resolve() != (root / ASSETS).resolve():
        shutil.copytree(assets, root / ASSETS, dirs_exist_ok=True)
    _replace_file(root / TRACKER, "release" if iteration is None else str(iteration))


def save_training_checkpoint(chunks: Sequence[torch.nn.Module], root: Path, iteration: int, record: dict,
                             assets: Optional[Path] = None) -> Path:
    """Save a training model (any layout; all ranks call this) the way Megatron-LM does: each chunk's
    sharded_state_dict under `model` (or `model0`, `model1`, ... with virtual pipelining)."""
    from megatron.core import parallel_state

    from wit_megatron.runtime.compat import save_distributed_checkpoint
    from wit_megatron.model import unwrap

    root = Path(root)
    directory = root / iteration_dir_name(iteration)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    arch = GPTArch.from_dict(record["arch"])
    models = [unwrap(c) for c in chunks]
    # The layout this run trains at, as Megatron-LM's own save records it in `args`.
    layout = ParallelLayout(tp=parallel_state.get_tensor_model_parallel_world_size(),
                            pp=parallel_state.get_pipeline_model_parallel_world_size(),
                            vpp=len(models) if len(models) > 1 else None,
                            cp=parallel_state.get_context_parallel_world_size())
    state = common_state(record, arch, getattr(torch, record["dtype"]), iteration, layout, torch.distributed.get_world_size())
    for i, model in enumerate(models):
        state["model" if len(models) == 1 else f"model{i}"] = model.sharded_state_dict()
    save_distributed_checkpoint(state, directory)
    if torch.distributed.get_rank() == 0:
        write_layout(root, iteration, record, assets)
    torch.distributed.barrier()
    return directory


def load_into_model(chunks: Sequence[torch.nn.Module], path: Path) -> tuple[set, set]:
    """Load a checkpoint (root or iteration dir) into this rank's model chunks at any layout, through
    megatron-core's `dist_checkpointing.load` against each chunk's sharded_state_dict (Megatron-LM's
    path). Returns (missing, unexpected) checkpoint keys over all chunks and ranks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from wit_megatron.model import unwrap

    _, directory = resolve(path)
    models = [unwrap(c) for c in chunks]
    # One load for all chunks, as Megatron-LM does: the access check counts every layer of the
    # stacked tensors across all chunks and ranks.
    request = {f"model{i}": model.sharded_state_dict() for i, model in enumerate(models)}
    state, not_requested, absent = dist_checkpointing.load(request, str(directory), strict=StrictHandling.RETURN_ALL)
    for i, model in enumerate(models):
        model.load_state_dict(state[f"model{i}"])
    # megatron-core's names are the other way round: its "unexpected" keys are requested but absent
    # from the checkpoint, its "missing" keys are in the checkpoint but requested by no rank.
    # "common_state": where megatron-core 0.17+ keeps the common state inside the files; no model key.
    return set(absent), set(not_requested) - {"common_state"}


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory renamed to `out` only when the block completes (and its files are
    on disk).

    An existing `out` is refused unless `force`; then it is replaced only after the new one is complete."""
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"output directory {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        _sync_tree(tmp)  # durable before it is renamed into place: a crash cannot leave a complete-looking `out`
        if out.exists():
            _replace_dir(tmp, out)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` over the existing directory `out`: the old one is moved aside first (a directory
    cannot be renamed over a non-empty one) and put back if `new` cannot take its place."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, old / out.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old / out.name, out)
        old.rmdir()
        raise
    shutil.rmtree(old)


def _replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (writers that already synced their files make this cheap)."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
