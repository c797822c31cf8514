"""Samples as the training's dataset yields them, target by target with role and weight.

The tensors are WITDataset's own (`dataset[i]`, or `dataset.assemble([record])` for one record
alone): nothing here recomputes a weight. The role code of each target, which the sample does not
carry, is read from the same flat role array at the same offsets the dataset assembles from, and
checked against the sample: the weight must be λ[role] and `response_mask` must be role == response,
else the view refuses (a disagreement would mean this tool shows something training does not see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from wit_megatron.roles import Role

ROLE_NAMES = {int(r): r.name.lower() for r in Role}
PADDING = -1  # `document` of a padding position


@dataclass
class Segment:
    """One record in a sample: the input before its first target (context only, never a target),
    then its targets at positions [start, end)."""

    record: int  # index in its prefix's records (0-based, in the order preprocessing wrote them)
    document: int  # index within the sample
    start: int
    end: int
    context_id: int


@dataclass
class SampleView:
    title: str  # "sample 3 of train (he)", "record 17 of he"
    prefix: str
    seq_length: int
    tensors: dict[str, torch.Tensor]  # exactly what the dataset yields
    roles: np.ndarray  # [s] int: role code of each target, -1 on padding
    segments: list[Segment]

    @property
    def weights(self) -> np.ndarray:
        return self.tensors["loss_weights"].numpy()

    @property
    def targets(self) -> int:
        return int(self.tensors["loss_mask"].sum())

    def counts(self) -> dict[str, dict]:
        """Per role present: targets and targets with non-zero weight."""
        out = {}
        for code, name in ROLE_NAMES.items():
            sel = self.roles == code
            if sel.any():
                out[name] = {"targets": int(sel.sum()), "weighted": int((self.weights[sel] != 0).sum())}
        return out


class ViewError(ValueError):
    pass


def _wit_dataset_of(dataset, idx: int):
    """(WITDataset, its sample index) behind sample `idx` of a dataset megatron-core's builder made (a blend or not)."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    if isinstance(dataset, BlendedDataset):
        return dataset.datasets[int(dataset.dataset_index[idx])], int(dataset.dataset_sample_index[idx])
    return dataset, idx


def target_roles(dataset, records: Sequence[int]) -> np.ndarray:
    """Role code of each target the dataset assembles from `records` (in order), as assemble_sample reads them."""
    parts = [dataset.data.roles[dataset.record_target[r] : dataset.record_target[r] + dataset.record_size[r]] for r in records]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _view(dataset, records: np.ndarray, tensors: dict, title: str) -> SampleView:
    s = dataset.seq_length
    roles = np.full(s, -1, dtype=np.int64)
    kept = target_roles(dataset, records)
    roles[: len(kept)] = kept
    mask = tensors["loss_mask"].numpy() != 0
    weights = tensors["loss_weights"].numpy()
    expected_weights = np.where(roles >= 0, dataset.weight_of_role[np.maximum(roles, 0)], 0.0).astype(np.float32)
    if int(mask.sum()) != len(kept) or not mask[: len(kept)].all():
        raise ViewError(f"{title}: the sample has {int(mask.sum())} targets, its records {len(kept)}")
    if not np.array_equal(weights, expected_weights):
        bad = int(np.flatnonzero(weights != expected_weights)[0])
        raise ViewError(f"{title}: position {bad} has weight {weights[bad]}, λ of its role {ROLE_NAMES.get(int(roles[bad]))} is "
                        f"{expected_weights[bad]}")
    if not np.array_equal(tensors["response_mask"].numpy(), roles == int(Role.RESPONSE)):
        raise ViewError(f"{title}: response_mask disagrees with the stored role codes")
    segments, start = [], 0
    for document, record in enumerate(records):
        size = int(dataset.record_size[record])
        context = int(dataset.data.tokens[dataset.record_input[record]])
        segments.append(Segment(int(record), document, start, start + size, context))
        start += size
    return SampleView(title, dataset.dataset_path, s, tensors, roles, segments)


def sample_view(dataset, idx: int, split_name: str = "train") -> SampleView:
    """Sample `idx` of a split, as training reads it (dataset[idx])."""
    if not 0 <= idx < len(dataset):
        raise ViewError(f"--sample {idx}: the {split_name} split has {len(dataset)} samples (0 to {len(dataset) - 1})")
    tensors = dataset[idx]
    wit, local = _wit_dataset_of(dataset, idx)
    tensors = {k: v for k, v in tensors.items() if k != "dataset_id"}
    return _view(wit, wit.records_of(local), tensors, f"sample {idx} of {split_name} ({wit.dataset_path})")


def record_view(dataset, record: int) -> SampleView:
    """Record `record` of the dataset's prefix alone in a sample (an unpacked sample of it)."""
    n = len(dataset.data)
    if not 0 <= record < n:
        raise ViewError(f"--index {record}: {dataset.dataset_path} has {n} records (0 to {n - 1})")
    title = f"record {record} of {dataset.dataset_path}"
    if dataset.record_size[record] == 0:
        raise ViewError(f"{title}: left out by the dataset (longer than --seq-length + 1 tokens, and truncation "
                        f"{dataset.config.truncation!r} keeps no response target of it)")
    records = np.asarray([record])
    return _view(dataset, records, dataset.assemble(records), title)


@dataclass(frozen=True)
class DatasetOptions:
    """The training's data options (the same names and defaults as examples/pretrain_wit.py)."""

    data_path: list[str]
    role_weights: object  # RoleWeights
    seq_length: int
    split: str
    seed: int
    packing: bool
    train_epochs: Optional[int]
    train_samples: Optional[int]
    data_cache_path: Optional[str]


def build_split(options: DatasetOptions, split_name: str):
    """The train or valid dataset exactly as the training loop builds it (loader.build_datasets)."""
    from wit_megatron.data.loader import DataConfig, build_datasets, parse_blend

    config = DataConfig(blend=parse_blend(options.data_path), blend_per_split=None, split=options.split,
                        seq_length=options.seq_length, seed=options.seed, role_weights=options.role_weights,
                        packing=options.packing, train_epochs=options.train_epochs, cache_path=options.data_cache_path,
                        num_workers=0)
    train, valid = build_datasets(config, options.train_samples, None, True)
    dataset = {"train": train, "valid": valid}[split_name]
    if dataset is None:
        raise ViewError(f"the {split_name} split of --split {options.split} is empty")
    return dataset


def build_records(options: DatasetOptions, prefix: str):
    """A WITDataset over every record of `prefix` (its index cached in a temporary directory, not next to
    the data), for viewing records one by one as the dataset cuts them."""
    import tempfile

    from megatron.core.datasets.utils import Split

    from wit_megatron.data.dataset import WITDataset, WITDatasetConfig
    from wit_megatron.data.indexed import WITIndexedData

    data = WITIndexedData(prefix)
    with tempfile.TemporaryDirectory(prefix="wit-inspect-") as cache:
        config = WITDatasetConfig(random_seed=options.seed, sequence_length=options.seq_length, blend=([prefix], None),
                                  split="100,0,0", role_weights=options.role_weights, packing=False, index_cache_dir=cache)
        return WITDataset(data, prefix, np.arange(len(data), dtype=np.int32), None, Split.train, config)
