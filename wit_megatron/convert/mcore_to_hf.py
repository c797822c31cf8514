"""Megatron-Core torch_dist checkpoint (converted or saved by training, any layout) -> Hugging Face.

Reads one layer at a time through megatron-core's `dist_checkpointing.load` with a partial
sharded_state_dict (the checkpoint's layer axis sliced by the ShardedTensor offsets), so resident
memory is about one layer; every output tensor's name, dtype and shape is planned from the
checkpoint metadata first, and safetensors shards are streamed to disk as layers arrive.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from wit_megatron.convert import checkpoint as ckpt
from wit_megatron.convert.families import family_for
from wit_megatron.convert.safetensors_io import PlannedTensor, StreamingSafetensorsWriter
from wit_megatron.convert.torch_dist_reader import read_regions, tensor_metadata
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def convert_megatron_to_hf(megatron: Path, out: Path, force: bool = False, dry_run: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Optional[Path]:
    """Write an HF model directory `out` from a checkpoint root or iteration directory."""
    root, directory = ckpt.resolve(Path(megatron))
    out = Path(out)
    record = ckpt.read_record(root, directory)
    hf_config = record.get("hf_config")
    if not hf_config:
        raise ConversionError(f"{root}: the architecture record holds no HF config.json to export with")
    _, family = family_for(hf_config)
    arch = GPTArch.from_dict(record["arch"])
    if out.exists() and not force and not dry_run:
        raise ConversionError(f"output directory {out} exists; pass --force to replace it")

    ckpt.ensure_single_process()
    stored = tensor_metadata(directory)
    model = ckpt.meta_model(arch, getattr(torch, record["dtype"]))
    rules = {r.megatron: r for r in family.rules_for(arch)}
    entries = list(ckpt.tensor_entries(model.sharded_state_dict()))
    tensors, layer_plans = [], []
    for name, key, layer, entry in entries:
        if key not in stored:
            raise ConversionError(f"{directory}: checkpoint lacks {key} (its record describes a different model?)")
        expected = _global_shape(entry, arch)
        if tuple(stored[key].size) != expected:
            raise ConversionError(
                f"{directory}: {key} has shape {tuple(stored[key].size)}, the recorded architecture needs {expected}"
            )
        rule = rules[key]
        dtype = stored[key].properties.dtype
        meta = torch.empty(entry.data.shape, dtype=dtype, device="meta")
        hf = rule.transform.to_hf(meta, arch)
        planned = [PlannedTensor(n, dtype, tuple(t.shape)) for n, t in zip(rule.hf_names(layer), hf)]
        tensors.append((name, rule, layer, entry, planned))
        layer_plans.extend(planned)
    if dry_run:
        for name, rule, layer, entry, planned in tensors:
            target = rule.megatron if layer is None else f"{rule.megatron}[{layer}]"
            print(f"{target} {list(entry.data.shape)} -> " + " + ".join(f"{p.name} {list(p.shape)}" for p in planned)
                  + f" ({rule.transform.name})")
        return None

    bar = tqdm_bar(len(tensors), progress)
    with ckpt.atomic_output_dir(out, force) as tmp:
        writer = StreamingSafetensorsWriter(tmp, layer_plans, max_shard_bytes)
        # One tensor at a time: resident memory is about the largest Megatron tensor.
        for _, rule, layer, entry, planned in tensors:
            buffer = torch.empty(entry.data.shape, dtype=stored[entry.key].properties.dtype)
            if layer is None:
                read_regions(directory, {entry.key: ((0,) * buffer.dim(), buffer)})
            else:  # stacked: [1, ...] at (layer, 0, ...)
                read_regions(directory, {entry.key: ((layer,) + (0,) * buffer.dim(), buffer.unsqueeze(0))})
            try:
                hf = rule.transform.to_hf(buffer, arch)
            except ConversionError as e:  # e.g. KV-head copies that diverged in training
                raise ConversionError(f"{directory}: {entry.key}, layer {layer}: {e}") from None
            for p, tensor in zip(planned, hf):
                writer.write(p.name, tensor)
            bar.update(1)
        writer.finish()
        _write_configs(root, tmp, hf_config, layer_plans)
    bar.close()
    return out


def _global_shape(entry, arch: GPTArch) -> tuple[int, ...]:
    shape = tuple(entry.data.shape)
    return (arch.num_layers, *shape) if entry.key.startswith("decoder.layers.") else shape


def _write_configs(root: Path, out: Path, hf_config: dict, plans: list[PlannedTensor]) -> None:
    """config.json from the record (its dtype field set to the weights' if they differ), then the
    tokenizer files and generation_config.json kept at conversion time."""
    config = dict(hf_config)
    weights_dtype = str(plans[0].dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config and config[key] != weights_dtype:
            config[key] = weights_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    assets = root / ckpt.ASSETS
    if assets.is_dir():
        for path in sorted(assets.iterdir()):
            if path.is_file() and path.name != "config.json":
                shutil.copy2(path, out / path.name)


def tqdm_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="Megatron -> HF", unit="tensor", disable=not enabled, file=sys.stderr)
