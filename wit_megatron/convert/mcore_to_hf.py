"""Megatron-Core torch_dist checkpoint (converted or saved by training, any layout) -> Hugging Face.

Every output tensor's name, dtype and shape is planned first from the checkpoint's DCP metadata and
its architecture record (no model is built and megatron-core is not imported). Then one layer at a
time is read through torch DCP (`torch_dist_reader`), the next while the previous is written, so
resident memory is about two layers, and safetensors shards are streamed to disk as layers arrive.
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from wit_megatron import checkpoint as ckpt
from wit_megatron.convert.families import Family, Rule, family_for, hf_shapes, megatron_shapes
from wit_megatron.convert.hf_to_mcore import is_asset
from wit_megatron.convert.safetensors_io import PlannedTensor, StreamingSafetensorsWriter, written_by_export
from wit_megatron.convert.torch_dist_reader import TorchDistReader
from wit_megatron.convert.transforms import ConversionError
from wit_megatron.model import GPTArch
from wit_megatron.output import OutputKind, atomic_output_dir, check_output

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
HF_OUTPUT = OutputKind("Hugging Face model", written_by_export)


def convert_megatron_to_hf(megatron: Path, out: Path, force: bool = False, dry_run: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                           hf_config: Optional[Path] = None) -> Optional[Path]:
    """Write an HF model directory `out` from a checkpoint root or iteration directory, written by this
    project, Megatron-LM or Megatron-Bridge; `hf_config` is a template config.json (`ckpt.open_checkpoint`)."""
    opened = ckpt.open_checkpoint(Path(megatron), hf_config)
    root, directory, arch = opened.root, opened.directory, opened.arch
    inputs = [root] if hf_config is None else [root, Path(hf_config)]  # what --force never replaces
    out = Path(out)
    hf_config = opened.record.get("hf_config")
    if not isinstance(hf_config, dict) or not hf_config:
        raise ConversionError(
            f"{opened.record_location}: the architecture record has no hf_config, the HF config.json that export writes; "
            "was the checkpoint converted from a Hugging Face model?"
        )
    _, family = family_for(hf_config)
    if not dry_run:
        check_output(out, force, inputs, HF_OUTPUT)

    reader = TorchDistReader(directory)
    layers = plan(directory, family, arch, reader.tensors)
    if dry_run:
        for group in layers:
            for item in group:
                print(f"{item.target} {list(item.shape)} -> "
                      + " + ".join(f"{p.name} {list(p.shape)}" for p in item.planned) + f" ({item.rule.transform.name})")
        return None

    planned = [p for group in layers for item in group for p in item.planned]
    bar = tqdm_bar(sum(map(len, layers)), progress)
    with atomic_output_dir(out, force, inputs, HF_OUTPUT) as tmp:
        writer = StreamingSafetensorsWriter(tmp, planned, max_shard_bytes)
        # One DCP read per layer (per embedding / final-norm / output group), the next one read in a
        # thread while this one is written (file reads and writes release the GIL): resident memory
        # is about two layers, and DCP's per-read overhead is paid once per layer.
        def read(group: list[Item]) -> list[torch.Tensor]:
            buffers = [torch.empty(item.shape, dtype=item.dtype) for item in group]
            reader.read({item.rule.megatron: item.region(buffer) for item, buffer in zip(group, buffers)})
            return buffers

        with ThreadPoolExecutor(max_workers=1) as prefetch:
            next_read = prefetch.submit(read, layers[0])
            for index, group in enumerate(layers):
                buffers = next_read.result()
                if index + 1 < len(layers):
                    next_read = prefetch.submit(read, layers[index + 1])
                for item, buffer in zip(group, buffers):
                    try:
                        hf = item.rule.transform.to_hf(buffer, arch)
                    except ConversionError as e:  # e.g. KV-head copies that diverged in training
                        raise ConversionError(f"{directory}: {item.target}: {e}") from None
                    for p, tensor in zip(item.planned, hf):
                        writer.write(p.name, tensor)
                    bar.update(1)
                del buffers, hf
        writer.finish()
        _write_configs(opened.assets, tmp, hf_config, planned)
    bar.close()
    return out


@dataclass(frozen=True)
class Item:
    """One Megatron tensor (one layer of a stacked key) and the HF tensors it becomes."""

    rule: Rule
    layer: Optional[int]
    shape: tuple[int, ...]  # of this layer's tensor
    dtype: torch.dtype
    planned: list[PlannedTensor]

    @property
    def target(self) -> str:
        return self.rule.megatron if self.layer is None else f"{self.rule.megatron}[{self.layer}]"

    def region(self, buffer: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
        """(global offsets, destination) of this item: a stacked key is read as [1, ...] at its layer."""
        if self.layer is None:
            return (0,) * buffer.dim(), buffer
        return (self.layer,) + (0,) * buffer.dim(), buffer.unsqueeze(0)


def plan(directory: Path, family: Family, arch: GPTArch, stored: dict) -> list[list[Item]]:
    """Every output tensor's name, dtype and shape, grouped as they are read: the tensors before the
    layers (embedding), one group per layer, the tensors after (final norm, output layer). Planned from
    the checkpoint's metadata and the record alone (no model is built); the stored tensors must be
    exactly the ones the recorded architecture gives, with its shapes."""
    shapes = megatron_shapes(arch)
    rules = family.rules_for(arch)
    # A training save also holds the optimizer's state, RNG states, ...: only the model is exported.
    stored = {key: value for key, value in stored.items() if not key.startswith(ckpt.NOT_MODEL_STATE)}
    unclaimed = sorted(set(stored) - {rule.megatron for rule in rules})
    if unclaimed:  # exporting without them would silently drop weights the model was trained with
        raise ConversionError(
            f"{directory}: the checkpoint holds {len(unclaimed)} tensor(s) the recorded architecture has no place for: "
            f"{', '.join(unclaimed)} (its record describes a different model?)"
        )
    first_layer_rule = next(i for i, r in enumerate(rules) if r.per_layer)
    groups: dict[object, list[Item]] = {"head": [], **{layer: [] for layer in range(arch.num_layers)}, "tail": []}
    for index, rule in enumerate(rules):
        key = rule.megatron
        if key not in stored:
            raise ConversionError(f"{directory}: checkpoint lacks {key} (its record describes a different model?)")
        expected = (arch.num_layers, *shapes[key]) if rule.per_layer else shapes[key]
        if tuple(stored[key].size) != expected:
            raise ConversionError(
                f"{directory}: {key} has shape {tuple(stored[key].size)}, the recorded architecture needs {expected}"
            )
        dtype = stored[key].properties.dtype
        shapes_of_hf = hf_shapes(rule, arch)
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            planned = [PlannedTensor(n, dtype, s) for n, s in zip(rule.hf_names(layer), shapes_of_hf)]
            group = layer if rule.per_layer else ("head" if index < first_layer_rule else "tail")
            groups[group].append(Item(rule, layer, shapes[key], dtype, planned))
    return [group for group in groups.values() if group]


def _write_configs(assets: Optional[Path], out: Path, hf_config: dict, plans: list[PlannedTensor]) -> None:
    """The tokenizer files and generation_config.json kept with the checkpoint (`Checkpoint.assets`), then
    config.json from the record (its dtype field set to the weights' if they differ): config.json,
    without which nothing loads the directory, is written last."""
    if assets is not None:
        for path in sorted(assets.iterdir()):
            # a --hf-config directory may be a whole HF model: its weights and config.json are not assets
            if is_asset(path) and path.name != "config.json":
                shutil.copy2(path, out / path.name)
    config = dict(hf_config)
    weights_dtype = str(plans[0].dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config and config[key] != weights_dtype:
            config[key] = weights_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def tqdm_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="Megatron -> HF", unit="tensor", disable=not enabled, file=sys.stderr)
