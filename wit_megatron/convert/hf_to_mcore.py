"""Hugging Face directory -> Megatron-Core torch_dist checkpoint in Megatron-LM's layout.

Tensors are read one rule at a time (lazily, from safetensors), transformed and handed to
megatron-core's `dist_checkpointing.save` inside the sharded_state_dict structure of a single-rank
GPTModel built on the meta device. The checkpoint therefore has exactly the keys, stacked layer
axis and global shapes megatron-core itself writes, and reshards on load to any TP/PP/VPP layout.
The HF tensors are memory maps of the safetensors files (`SafetensorsReader.read`): the tensors that
pass unchanged are read by megatron-core's writer processes as they write them, so reading overlaps
writing and only transformed tensors (the QKV interleave, a cast, vocabulary padding) take memory here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from wit_megatron import checkpoint as ckpt, staging
from wit_megatron.convert.families import Family, Rule, family_for, hf_shapes
from wit_megatron.convert.hf_config import arch_from_hf_config
from wit_megatron.convert.safetensors_io import SafetensorsReader
from wit_megatron.convert.sharded import meta_model, tensor_entries, with_data
from wit_megatron.convert.transforms import ConversionError, head_dim
from wit_megatron.megatron_lm_args import megatron_lm_caveats
from wit_megatron.model import GPTArch
from wit_megatron.output import OutputKind, atomic_output_dir, check_output
from wit_megatron.runtime.parallel import init_single_process

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".distcp")
# Buffers some HF checkpoints carry that are recomputed from the config, not weights.
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files written in parallel by the torch_dist writer (one forked process each). Writing is pickling
# and I/O bound: on the 2-core development machine a 1 GB model saved in about 2 s with 1, 1.5 s
# with 2 and 1.1 s with 4 (8: no further gain); megatron-core's default is 2 (0.16) or 1 (0.19).
WRITERS = 4
CHECKPOINT_OUTPUT = OutputKind("Megatron checkpoint", ckpt.written_by_wit)


@dataclass(frozen=True)
class Step:
    """One Megatron tensor: which HF tensors, through which transform."""

    rule: Rule
    layer: Optional[int]
    hf_names: tuple[str, ...]

    @property
    def megatron(self) -> str:
        return self.rule.megatron if self.layer is None else f"{self.rule.megatron}[{self.layer}]"


def read_hf_config(hf_dir: Path) -> dict:
    try:
        staging.refuse_staging(hf_dir, "Hugging Face model")
    except staging.StagingError as e:
        raise ConversionError(str(e)) from None
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # invalid JSON or text
        raise ConversionError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def plan(family: Family, arch: GPTArch, reader: SafetensorsReader, cast: Optional[torch.dtype] = None) -> list[Step]:
    """Every Megatron tensor with its HF sources; refuses missing or unused HF tensors, any HF tensor
    whose shape is not the one the config implies, and sources of one Megatron tensor with different
    dtypes (unless `cast` makes them one), before anything is read or written."""
    steps = []
    for rule in family.rules_for(arch):
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            steps.append(Step(rule, layer, tuple(rule.hf_names(layer))))
    wanted = {name for step in steps for name in step.hf_names}
    missing = sorted(wanted - set(reader.infos))
    if missing:
        raise ConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config requires, e.g. {', '.join(missing[:5])}"
        )
    unused = sorted(n for n in set(reader.infos) - wanted if not n.endswith(IGNORED_HF_TENSORS))
    if unused == ["lm_head.weight"] and arch.tie_embeddings:
        # Tied: a file may still hold the output matrix; it is accepted only as an exact copy of the embedding.
        head, embedding = reader.infos["lm_head.weight"], reader.infos["model.embed_tokens.weight"]
        if (head.shape, head.dtype) != (embedding.shape, embedding.dtype) \
                or not torch.equal(reader.read("lm_head.weight"), reader.read("model.embed_tokens.weight")):
            raise ConversionError(
                f"config.json ties embeddings (tie_word_embeddings) but lm_head.weight in {head.file.name} differs from "
                f"model.embed_tokens.weight in {embedding.file.name} (a tied model has one matrix for both)"
            )
        unused = []
    if unused:
        raise ConversionError(
            f"{len(unused)} checkpoint tensor(s) have no place in the model its config describes, "
            f"e.g. {', '.join(f'{n} in {reader.infos[n].file.name}' for n in unused[:5])}"
        )
    # Shapes and dtypes from the file headers: nothing is read.
    implied = {rule.megatron: hf_shapes(rule, arch) for rule in family.rules_for(arch)}
    for step in steps:
        for name, expected in zip(step.hf_names, implied[step.rule.megatron]):
            info = reader.infos[name]
            if tuple(info.shape) != expected:
                raise ConversionError(
                    f"{name} in {info.file.name} has shape {tuple(info.shape)}; config.json implies {expected} "
                    f"({_config_dims(family, arch)})"
                )
        dtypes = {reader.infos[n].dtype for n in step.hf_names}
        if len(dtypes) > 1 and cast is None:
            # They become one tensor, of one dtype: concatenating would silently promote the others.
            sources = ", ".join(f"{n} {str(reader.infos[n].dtype).removeprefix('torch.')} in {reader.infos[n].file.name}"
                                for n in step.hf_names)
            raise ConversionError(
                f"{step.megatron} is made of HF tensors of different dtypes ({sources}); a checkpoint tensor has one "
                "dtype: pass --dtype to cast them all"
            )
    return steps


def _config_dims(family: Family, arch: GPTArch) -> str:
    """The config.json sizes tensor shapes follow from, under their config.json names."""
    dims = {"vocab_size": arch.tokenizer_vocab_size, "hidden_size": arch.hidden_size,
            "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.hf_kv_heads,
            "kv_channels": head_dim(arch), "ffn_hidden_size": arch.ffn_hidden_size}
    return ", ".join(f"{family.config[field]}={value}" for field, value in dims.items())


def describe(steps: list[Step], reader: SafetensorsReader, arch: GPTArch) -> str:
    lines = [f"architecture: {json.dumps(arch.to_dict())}"]
    for step in steps:
        sources = " + ".join(f"{n} {list(reader.infos[n].shape)} {str(reader.infos[n].dtype)[6:]}" for n in step.hf_names)
        lines.append(f"{sources} -> {step.megatron} ({step.rule.transform.name})")
    return "\n".join(lines)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one of them makes a tokenizer


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def is_asset(path: Path) -> bool:
    """A tokenizer file, generation_config.json or the like: every small non-weight file of an HF model directory."""
    return path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json")


def copy_assets(hf_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(hf_dir).iterdir()):
        if is_asset(path):
            shutil.copy2(path, dest / path.name)


def convert_hf_to_megatron(hf_dir: Path, out: Path, dtype: Optional[str] = None, force: bool = False,
                           vocab_multiple: Optional[int] = None, dry_run: bool = False,
                           progress: bool = True, layer_spec: str = "te", kv_replicas: int = 1) -> Optional[Path]:
    """Write `out` (Megatron-LM layout, `release/`). Returns `out`, or None for a dry run (mapping printed).
    `kv_replicas`: copies of each KV head (see `GPTArch.kv_replicas`)."""
    hf_dir, out = Path(hf_dir), Path(out)
    config = read_hf_config(hf_dir)
    family_name, family = family_for(config)
    arch = arch_from_hf_config(family, config, vocab_multiple, kv_replicas)
    reader = SafetensorsReader(hf_dir)
    target = DTYPES[dtype] if dtype else None
    steps = plan(family, arch, reader, target)
    if dry_run:
        print(describe(steps, reader, arch))
        return None
    check_output(out, force, [hf_dir], CHECKPOINT_OUTPUT)
    model_dtype = target or reader.infos[steps[0].hf_names[0]].dtype  # the embedding's

    init_single_process()
    model = meta_model(arch, model_dtype)
    by_key = {(s.rule.megatron, s.layer): s for s in steps}
    structure = model.sharded_state_dict()
    entries = list(tensor_entries(structure))
    unplanned = [f"{key}[{layer}]" for _, key, layer, _ in entries if (key, layer) not in by_key]
    if unplanned or len(entries) != len(steps):
        raise ConversionError(f"internal: the {family_name} table does not match Megatron's tensors {unplanned}")
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    sharded = dict(structure)  # keeps the `_extra_state` objects as megatron-core made them
    bar = _progress(len(entries), "HF -> Megatron: tensors", progress)
    for name, key, layer, entry in entries:
        step = by_key[(key, layer)]
        tensors = [reader.read(n) for n in step.hf_names]
        if target is not None:
            tensors = [t.to(target) for t in tensors]
        if isinstance(entry, ShardedTensorFactory):
            # The gated-MLP factory saves [gate; up] as two pieces; hand it the HF tensors themselves
            # rather than views of their concatenation (the writer would clone those): no copy at all.
            built = entry.build()  # meta pieces: keys, offsets and shapes as megatron-core saves them
            parts = step.rule.transform.pieces(tensors, arch)
            if len(parts) != len(built):
                raise ConversionError(f"internal: {key} is saved in {len(built)} pieces, the table gives {len(parts)}")
            sharded[name] = [with_data(piece, part) for piece, part in zip(built, parts)]
        else:
            sharded[name] = with_data(entry, step.rule.transform.to_megatron(tensors, arch))
        bar.update(1)
    bar.close()

    record = dict(ckpt.make_record(family_name, arch, model_dtype, config), layer_spec=layer_spec)
    state = ckpt.common_state(record, arch, model_dtype, None, tokenizer=out / ckpt.ASSETS if has_tokenizer(hf_dir) else None)
    state["model"] = sharded
    from wit_megatron.runtime.compat import save_distributed_checkpoint

    with atomic_output_dir(out, force, [hf_dir], CHECKPOINT_OUTPUT) as tmp:
        directory = tmp / ckpt.iteration_dir_name(None)
        directory.mkdir()
        with _write_progress(directory, _tensor_bytes(sharded), progress):
            save_distributed_checkpoint(state, directory, writers=WRITERS)
        copy_assets(hf_dir, tmp / ckpt.ASSETS)
        ckpt.write_layout(tmp, None, record, None)
    for caveat in megatron_lm_caveats(arch):
        print(f"note: {caveat}", file=sys.stderr)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def _tensor_bytes(sharded: dict) -> int:
    """Bytes of tensor data the checkpoint will hold."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces = [p for v in sharded.values() for p in (v if isinstance(v, list) else [v]) if isinstance(p, ShardedTensor)]
    return sum(p.data.numel() * p.data.element_size() for p in pieces)


@contextlib.contextmanager
def _write_progress(directory: Path, total_bytes: int, enabled: bool) -> Iterator[None]:
    """A bytes bar for megatron-core's save: its writer processes report nothing, so a thread here
    polls the size of the checkpoint files they are writing."""
    from tqdm import tqdm

    if not enabled:
        yield
        return
    bar = tqdm(total=total_bytes, desc="HF -> Megatron: writing", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.25):
            try:
                written = sum(f.stat().st_size for f in Path(directory).glob("*.distcp"))
            except FileNotFoundError:  # a file renamed between listing and stat: count it next time
                continue
            bar.update(min(written, total_bytes) - bar.n)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    completed = False
    try:
        yield
        completed = True
    finally:
        done.set()
        thread.join()
        if completed:
            bar.update(total_bytes - bar.n)
        bar.close()
