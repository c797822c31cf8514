"""Checkpoints: Megatron-LM's directory layout, the architecture record, and the training state.

    ROOT/latest_checkpointed_iteration.txt   "release" or the iteration number, written last
    ROOT/release/ or ROOT/iter_0000100/      a megatron-core torch_dist checkpoint (metadata.json,
                                             .metadata, *.distcp, common.pt)
    ROOT/wit_megatron.json                   this project's record: family, GPTArch, TransformerConfig
                                             fields, the HF config.json, dtype
    ROOT/megatron_lm_flags.txt               the model's Megatron-LM arguments (megatron_lm_args.py)
    ROOT/hf_assets/                          tokenizer files and generation_config.json, copied back on export

A converted model is a "release" (Megatron-LM's word): it holds only weights. A training save
(`save`) holds, as Megatron-LM's own save does, the model (`model`, or `model0`, `model1`, ... with a
virtual pipeline), the optimizer's sharded state, the LR scheduler, every rank's RNG states and the
run's position (`train_state`: iteration, consumed samples, the data it was trained on). Every part
is resharded by megatron-core's dist_checkpointing, so a save loads at any TP/PP/DP layout.

The common state holds what Megatron-LM's `load_checkpoint` reads (`args`, `checkpoint_version`,
`iteration`) and the same record under "wit_megatron", so an iteration directory alone is enough.
An iteration directory is written under a hidden name and renamed into place when complete; the
tracker file follows, so an interrupted save is never taken for the latest one.

Checkpoints may come from elsewhere: before anything reads an iteration directory, `check_files`
checks every pickle in it against wit_megatron.safe_pickle's admission list (torch DCP and
megatron-core would run whatever they name) and that every stored item lies within its file (a
truncated or missing `.distcp` is named with the tensor it holds). A path inside a hidden staging
directory is refused, and a root whose record exists without its tracker file (written last) is an
interrupted write, not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from wit_megatron import safe_pickle, staging
from wit_megatron.megatron_lm_args import FLAGS_FILE, flags_file_text, megatron_lm_args
from wit_megatron.model import GPTArch, transformer_config, unwrap
from wit_megatron.runtime.parallel import ParallelLayout

TRACKER = "latest_checkpointed_iteration.txt"
# How model and optimizer state are laid out in a save, as Megatron-LM's `--dist-ckpt-optim-fully-reshardable`
# lays them out (stored as the checkpoint's content metadata): the distributed optimizer's state is saved
# per parameter, so it reshards to any TP/PP/DP layout.
CONTENT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                    "singleton_local_shards": False}
RECORD = "wit_megatron.json"
# Sharded entries of a training save that are not model weights: the optimizer, the RNG states, the
# rerun state machine's state (Megatron-LM's own saves), and where megatron-core 0.17+ keeps the
# common state inside the files.
NOT_MODEL_STATE = ("optimizer.", "rng_state", "rerun_state_machine_state", "common_state")
ASSETS = "hf_assets"
RECORD_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the request; the message names it and says why."""


def iteration_dir_name(iteration: Optional[int]) -> str:
    """Megatron-LM's names: `release` for a converted model, `iter_0000100` for training saves."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


def resolve(path: Path) -> tuple[Path, Path]:
    """(root, iteration directory) of a checkpoint given its root (tracker file) or an iteration dir,
    its files checked (`check_files`)."""
    root, directory = _locate(Path(path))
    check_files(directory)
    return root, directory


def _locate(path: Path) -> tuple[Path, Path]:
    try:
        staging.refuse_staging(path, "checkpoint")
    except staging.StagingError as e:
        raise CheckpointError(str(e)) from None
    if (path / TRACKER).exists():
        tag = (path / TRACKER).read_text().strip()
        try:
            iteration = None if tag == "release" else int(tag)
        except ValueError:
            raise CheckpointError(f"{path / TRACKER}: expected 'release' or an iteration number, found {tag[:40]!r}") from None
        directory = path / iteration_dir_name(iteration)
        if not directory.is_dir():
            raise CheckpointError(f"{path / TRACKER} names {directory.name}, which does not exist")
        return path, directory
    if (path / "metadata.json").exists():
        if (path.parent / RECORD).exists() and not (path.parent / TRACKER).exists():
            raise CheckpointError(f"{path}: {path.parent} holds {RECORD} but no {TRACKER}, which is written last: an "
                                  "interrupted conversion or first save, not a complete checkpoint")
        return path.parent, path
    if (path / RECORD).exists():
        raise CheckpointError(f"{path}: has {RECORD} but no {TRACKER}, which is written last: an interrupted conversion "
                              "or first save, not a complete checkpoint")
    raise CheckpointError(
        f"{path}: not a Megatron checkpoint (no {TRACKER} and no metadata.json of a torch_dist checkpoint)"
    )


def written_by_wit(path: Path) -> bool:
    """Whether `path` is a checkpoint root this project wrote (a converted model or training saves):
    what `--force` may replace."""
    try:
        record = json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("arch"), dict)


_checked: dict[tuple, object] = {}  # (directory, its pickles' sizes and times) -> DCP metadata, per process


def check_files(directory: Path):
    """Check an iteration directory before anything reads it, and return its DCP metadata (unpickled
    safely): every pickle (`.metadata`, the objects stored in the `.distcp` files, `common.pt`) may refer
    only to what wit_megatron.safe_pickle admits, and every stored item must lie within its file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    directory = Path(directory)
    metadata_path = directory / ".metadata"
    if not metadata_path.is_file():
        raise CheckpointError(f"{directory}: no .metadata, the index of a torch_dist checkpoint's files: not a complete "
                              "torch_dist checkpoint")
    pickles = [metadata_path, *sorted(directory.rglob("*.pt"))]
    key = (str(directory.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in pickles))
    if key in _checked:
        return _checked[key]
    metadata = _refused_as_invalid(metadata_path, lambda: safe_pickle.loads(metadata_path.read_bytes()))
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{metadata_path}: not a valid checkpoint: not torch DCP metadata")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        file = directory / info.relative_path
        what = f"{'object' if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata) else 'tensor'} " \
               f"{index.fqn}"
        if Path(info.relative_path).is_absolute() or ".." in Path(info.relative_path).parts:
            raise CheckpointError(f"{metadata_path}: not a valid checkpoint: {what} is stored outside the checkpoint "
                                  f"({info.relative_path})")
        if info.relative_path not in sizes:
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: it holds {what} (and possibly more) of this checkpoint")
            sizes[info.relative_path] = file.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(f"{file} is truncated: it holds {sizes[info.relative_path]} bytes, {what} is stored at bytes "
                                  f"{info.offset}..{info.offset + info.length}")
        if what.startswith("object"):
            with open(file, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            _refused_as_invalid(file, lambda: safe_pickle.check_torch_save(data), f"its {what}")
    for path in pickles[1:]:  # common.pt (megatron-core 0.16's common state), legacy sharded objects
        _refused_as_invalid(path, lambda: safe_pickle.check_torch_save(path.read_bytes()))
    _checked[key] = metadata
    return metadata


def _refused_as_invalid(path: Path, check, what: str = "it"):
    try:
        return check()
    except safe_pickle.RefusedPickle as e:
        raise CheckpointError(f"{path}: not a valid checkpoint: {what} {e}") from None


def read_record(root: Path, iteration_dir: Path) -> dict:
    """The architecture record: from ROOT/wit_megatron.json, else from the checkpoint's common state."""
    record = own_record(root, iteration_dir)
    if record is None:
        raise CheckpointError(
            f"{iteration_dir}: no {RECORD} next to it and no architecture record in its common state; "
            "was it written by this project's converter or training?"
        )
    return record


def own_record(root: Path, iteration_dir: Path, common: Optional[dict] = None) -> Optional[dict]:
    """This project's record of the checkpoint, or None if it has none (written elsewhere)."""
    if (root / RECORD).exists():
        try:
            record = json.loads((root / RECORD).read_text())
        except ValueError as e:  # invalid JSON or text
            raise CheckpointError(f"{root / RECORD}: unreadable architecture record ({e})") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{root / RECORD}: expected a JSON object, found {type(record).__name__}")
        return record
    common = load_common_state(iteration_dir) if common is None else common
    return json.loads(common["wit_megatron"]) if "wit_megatron" in common else None


COMMON_PT = "common.pt"
COMMON_STATE_OBJECT = "common_state/shard_0_1"  # megatron-core 0.17+: ShardedObject("common_state", (1,), (0,))


def load_common_state(iteration_dir: Path) -> dict:
    """The non-tensor state of a torch_dist checkpoint (args, iteration, record, train state, scheduler):
    megatron-core 0.16's `common.pt`, or 0.17+'s `common_state` object inside the `.distcp` files (where
    Megatron-Bridge's saves keep it). Read here, the same way on every megatron-core version, after
    `check_files` has checked the pickles (megatron-core 0.16 cannot read the second kind)."""
    import io

    directory = Path(iteration_dir)
    metadata = check_files(directory)
    if (directory / COMMON_PT).is_file():
        state = torch.load(directory / COMMON_PT, map_location="cpu", weights_only=False)
    else:
        stored = [(index, info) for index, info in metadata.storage_data.items() if index.fqn == COMMON_STATE_OBJECT]
        if not stored:
            return {}  # neither kind: a checkpoint with no common state
        (_, info), = stored
        with open(directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            state = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=False)
    if isinstance(state, list) and len(state) == 1:  # how megatron-core's loader unwraps the object
        state = state[0]
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory}: its common state is a {type(state).__name__}, not a dict")
    return state


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk, located and its record read: what every reader of a checkpoint needs first."""

    root: Path
    directory: Path  # the iteration directory (release/ or iter_XXXXXXX/)
    record: dict
    arch: GPTArch
    dtype: torch.dtype  # of the stored weights

    @property
    def iteration(self) -> Optional[int]:
        """None for a converted model (release), else the training iteration it was saved after."""
        name = self.directory.name
        return int(name.removeprefix("iter_")) if name.startswith("iter_") else None

    @property
    def record_location(self) -> str:
        """Where the record was read from, for error messages."""
        if "source" in self.record:  # written elsewhere: described by its args, run config or --hf-config
            return f"{self.directory} ({self.record['source']})"
        return str(self.root / RECORD) if (self.root / RECORD).exists() else f"{self.directory} (the record in its common state)"

    @property
    def assets(self) -> Optional[Path]:
        """The HF tokenizer files and generation config kept with the checkpoint (ours: hf_assets/;
        Megatron-Bridge's: tokenizer/ in the iteration directory), else those next to --hf-config, if any."""
        path = Path(self.record["assets"]) if self.record.get("assets") else self.root / ASSETS
        return path if path.is_dir() else None


def open_checkpoint(path: Path, hf_config: Optional[Path] = None) -> Checkpoint:
    """Locate a checkpoint (root or iteration directory) and read its architecture: this project's record,
    or for a checkpoint Megatron-LM or Megatron-Bridge wrote, what its `args` or run config say of the model
    (wit_megatron/convert/foreign.py). `hf_config` (an HF config.json or its directory) is a template: the
    HF config export writes, checked against what the checkpoint says, supplying what it does not say."""
    from wit_megatron.convert import foreign

    root, directory = resolve(Path(path))
    common = None if (root / RECORD).exists() else load_common_state(directory)
    record = own_record(root, directory, common)
    if record is None:
        record = foreign.record(root, directory, check_files(directory), common, hf_config)
    elif hf_config is not None:
        record = foreign.with_template(record, directory, check_files(directory), hf_config)
    try:
        arch = GPTArch.from_dict(record["arch"])
        dtype = getattr(torch, record["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        where = root / RECORD if (root / RECORD).exists() else directory
        raise CheckpointError(f"{where}: the architecture record has no valid arch/dtype ({type(e).__name__}: {e})") from None
    return Checkpoint(root, directory, record, arch, dtype)


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


def common_state(record: dict, arch: GPTArch, dtype: torch.dtype, iteration: Optional[int],
                 layout: ParallelLayout = ParallelLayout(), world_size: int = 1, tokenizer: Optional[Path] = None,
                 **args_extra) -> dict:
    """The common state of a save; `tokenizer`: the HF tokenizer directory kept with the checkpoint, named in
    `args` as Megatron-LM names its tokenizer (Megatron-Bridge's Megatron-LM reader builds it from there)."""
    args = megatron_lm_args(arch, dtype, layout, world_size)
    if tokenizer is not None:
        args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", str(Path(tokenizer).resolve())
    for name, value in args_extra.items():
        setattr(args, name, value)
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration or 0,
        "wit_megatron": json.dumps(record),
    }


def write_layout(root: Path, iteration: Optional[int], record: dict, assets: Optional[Path]) -> None:
    """The record, the HF assets and the tracker file around an already saved iteration directory."""
    # The tracker last: a training save interrupted before it still points at the previous
    # iteration. Each file is replaced whole, never left half-written.
    replace_file(root / RECORD, json.dumps(record, indent=2) + "\n")
    replace_file(root / FLAGS_FILE, flags_file_text(GPTArch.from_dict(record["arch"])))
    if assets is not None and assets.resolve() != (root / ASSETS).resolve():
        shutil.copytree(assets, root / ASSETS, dirs_exist_ok=True)
    replace_file(root / TRACKER, "release" if iteration is None else str(iteration))


def carry_record(source: Path, root: Path) -> bool:
    """Give the checkpoint root `root` the record, Megatron-LM flags and HF assets of the checkpoint at
    `source`, for saves written there by Megatron-LM's own training loop (which writes none of them)
    from a model this project converted. Returns whether `root` has a record now: False when `source`
    has none. A root that has one already is left as it is (a resumed run). The record is written last,
    so an interrupted copy is not taken for a complete one and is redone by the next call."""
    root = Path(root)
    if (root / RECORD).exists():
        return True
    try:
        ck = open_checkpoint(Path(source))
    except CheckpointError:
        return False
    root.mkdir(parents=True, exist_ok=True)
    if ck.assets is not None:
        staging = root / f".{ASSETS}.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ck.assets, staging)
        shutil.rmtree(root / ASSETS, ignore_errors=True)
        os.rename(staging, root / ASSETS)
    replace_file(root / FLAGS_FILE, flags_file_text(ck.arch))
    replace_file(root / RECORD, json.dumps(ck.record, indent=2) + "\n")
    return True


# ---- training saves ------------------------------------------------------------------------------


def _current_layout(models: Sequence[torch.nn.Module]) -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                          vpp=len(models) if len(models) > 1 else None, cp=ps.get_context_parallel_world_size())


def _model_state(models: Sequence[torch.nn.Module]) -> dict:
    """Each chunk's sharded_state_dict under Megatron-LM's key (`model`, or `model0`, `model1`, ...)."""
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": model.sharded_state_dict() for i, model in enumerate(models)}


def _rng_state():
    """This rank's RNG states as Megatron-LM saves them: one object per (pp, tp) rank, data-parallel replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state", [state],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def save(
    chunks: Sequence[torch.nn.Module],
    root: Path,
    iteration: int,
    record: dict,
    *,
    optimizer=None,
    scheduler=None,
    train_state: Optional[dict] = None,
    assets: Optional[Path] = None,
) -> Path:
    """Save a training model (any layout; every rank calls this) the way Megatron-LM does, with the
    optimizer, scheduler, RNG states and `train_state` when given. Returns the iteration directory.

    The directory is written under a hidden name and renamed into place only when every rank has
    finished writing; then the record and the tracker file. A save of an iteration that already
    exists (a run resumed and saved again) replaces it."""
    from wit_megatron.runtime.compat import save_distributed_checkpoint

    root = Path(root)
    models = [unwrap(c) for c in chunks]
    directory = root / iteration_dir_name(iteration)
    staging = root / f".{directory.name}.saving"
    rank = torch.distributed.get_rank()
    if rank == 0:
        if staging.exists():  # left by a save that was interrupted: never complete, ours by its name
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    torch.distributed.barrier()

    layout = _current_layout(models)
    record = dict(record, dtype=str(models[0].config.params_dtype).removeprefix("torch."))
    extra = {}
    if train_state is not None:
        extra = {"consumed_train_samples": train_state["consumed_train_samples"],
                 "consumed_valid_samples": train_state.get("consumed_valid_samples", 0)}
    tokenizer = root / ASSETS if assets is not None or (root / ASSETS).is_dir() else None
    state = common_state(record, GPTArch.from_dict(record["arch"]), models[0].config.params_dtype, iteration, layout,
                         torch.distributed.get_world_size(), tokenizer, **extra)
    state.update(_model_state(models))
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=dict(CONTENT_METADATA))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if train_state is not None:
        state["wit_train_state"] = train_state
        state["rng_state"] = _rng_state()
    save_distributed_checkpoint(state, staging, content_metadata=CONTENT_METADATA)

    if rank == 0:
        sync_tree(staging)
        if directory.exists():
            old = root / f".{directory.name}.replaced"
            if old.exists():
                shutil.rmtree(old)
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old)
        else:
            os.rename(staging, directory)
        fsync(root)
        write_layout(root, iteration, record, assets)
    torch.distributed.barrier()
    return directory


def load_into_model(chunks: Sequence[torch.nn.Module], path: Path) -> tuple[set, set]:
    """Load a checkpoint's weights (root or iteration dir) into this rank's model chunks at any layout,
    through megatron-core's `dist_checkpointing.load` against each chunk's sharded_state_dict
    (Megatron-LM's path). Returns (missing, unexpected) checkpoint keys over all chunks and ranks."""
    _, directory = resolve(path)
    models = [unwrap(c) for c in chunks]
    state, missing, unexpected = _load(directory, _model_state(models))
    _load_models(models, state)
    return missing, unexpected


def _load(directory: Path, request: dict) -> tuple[dict, set, set]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    check_files(directory)
    # One load for all chunks, as Megatron-LM does: the access check counts every layer of the
    # stacked tensors across all chunks and ranks.
    common = _common_state_strategy(directory)  # megatron-core 0.17+'s load takes none: it reads both layouts
    state, not_requested, absent = dist_checkpointing.load(request, str(directory), strict=StrictHandling.RETURN_ALL,
                                                           **({} if common is None else {"common_strategy": common}))
    # megatron-core's names are the other way round: its "unexpected" keys are requested but absent
    # from the checkpoint, its "missing" keys are in the checkpoint but requested by no rank.
    model_keys = {k for k in not_requested if not k.startswith(NOT_MODEL_STATE)}
    return state, set(absent), model_keys


def _common_state_strategy(directory: Path):
    """None (megatron-core's own), except where megatron-core knows only common.pt (0.16) and the checkpoint
    keeps its common state in the .distcp files (megatron-core 0.17+, Megatron-Bridge): then a strategy
    that reads it as `load_common_state` does."""
    from wit_megatron.runtime.compat import megatron_core_version

    if (Path(directory) / COMMON_PT).is_file() or megatron_core_version() >= (0, 17):
        return None
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy  # 0.16's name

    class CommonStateInFiles(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return load_common_state(Path(checkpoint_dir))

    return CommonStateInFiles()


def _load_models(models: Sequence[torch.nn.Module], state: dict) -> None:
    if len(models) == 1:
        models[0].load_state_dict(state["model"])
    else:
        for i, model in enumerate(models):
            model.load_state_dict(state[f"model{i}"])


def load_training_state(chunks: Sequence[torch.nn.Module], checkpoint: Checkpoint, optimizer=None, scheduler=None,
                        load_rng: bool = True) -> dict:
    """Resume from a training save: the weights, and the optimizer / scheduler state when given (the
    save must hold them), the RNG states when the save was made at this TP/PP layout. Returns the saved
    `train_state`. Refuses missing or unexpected model keys."""
    from megatron.core import parallel_state as ps

    from wit_megatron.runtime.compat import finish_optimizer_loading, prepare_optimizer_for_loading

    models = [unwrap(c) for c in chunks]
    common = load_common_state(checkpoint.directory)
    if "wit_train_state" not in common:
        raise CheckpointError(f"{checkpoint.directory}: not a training save of this project (no train state); "
                              "load it with --finetune to take its weights only")
    request = _model_state(models)
    if optimizer is not None:
        if "optimizer" not in common:
            raise CheckpointError(f"{checkpoint.directory}: saved without optimizer state (--no-save-optim); "
                                  "resume with --no-load-optim, or load with --finetune")
        prepare_optimizer_for_loading(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True, metadata=dict(CONTENT_METADATA))
    saved_args = common.get("args")
    same_layout = (getattr(saved_args, "tensor_model_parallel_size", None) == ps.get_tensor_model_parallel_world_size()
                   and getattr(saved_args, "pipeline_model_parallel_size", None) == ps.get_pipeline_model_parallel_world_size())
    if load_rng and same_layout:
        request["rng_state"] = _rng_state()
    state, missing, unexpected = _load(checkpoint.directory, request)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.directory}: model keys missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    _load_models(models, state)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        finish_optimizer_loading(optimizer)
    if scheduler is not None:
        try:
            scheduler.load_state_dict(common["opt_param_scheduler"])
        except AssertionError as e:  # megatron-core's check that the schedule is the saved one
            raise CheckpointError(f"{checkpoint.directory}: the run's learning-rate schedule is not the saved one "
                                  f"({e}); resume with the saved run's options, or start over with --finetune") from None
    if "rng_state" in state:
        _set_rng_state(state["rng_state"][0])
    return dict(common["wit_train_state"])


# ---- durable files ---------------------------------------------------------------------------------


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (writers that already synced their files make this cheap)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync(os.path.join(directory, name))
        fsync(directory)


def fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
