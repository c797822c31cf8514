"""Training and validation data as the training loop reads it: datasets, Megatron's sampler, micro-batches.

Datasets come from megatron-core's BlendedMegatronDatasetBuilder (`WITDataset`), or the synthetic task
without data. Sample order is the dataset's; the loop's position in it is one number, the consumed
samples, exactly as in Megatron-LM: from it, Megatron's sampler gives every data-parallel rank its
micro-batches, and a data-parallel rank reads only its own samples. Global batch k is always samples
[k·B, (k+1)·B) (B the global batch size), whatever the data-parallel size, so a run resumed at another
data-parallel size continues the same data.

A split whose length is not a multiple of B (an epoch-sized train split, the validation split) is
padded with all-padding samples (weight 0 everywhere: they add nothing to the loss or N).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from wit_megatron.data.indexed import dataset_files
from wit_megatron.roles import RoleWeights

Blend = tuple[list[str], Optional[list[float]]]


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are built."""

    blend: Optional[Blend]  # --data-path: one blend split by `split`; None with blend_per_split or synthetic data
    blend_per_split: Optional[list[Optional[Blend]]]  # --train-data-path / --valid-data-path
    split: str
    seq_length: int
    seed: int
    role_weights: RoleWeights
    packing: bool = True
    train_epochs: Optional[int] = None  # the train split's size in epochs (None: as many samples as asked)
    cache_path: Optional[str] = None
    num_workers: int = 2
    synthetic_vocab_size: Optional[int] = None  # no blend: the synthetic task over this vocabulary

    @property
    def synthetic(self) -> bool:
        return self.blend is None and self.blend_per_split is None


def parse_blend(values: Optional[Sequence[str]], option: str = "--data-path") -> Optional[Blend]:
    """Megatron-LM's blend syntax ('PREFIX ...' or 'WEIGHT PREFIX WEIGHT PREFIX ...') through
    megatron-core's parser; each prefix must be a preprocessed dataset."""
    from megatron.core.datasets.utils import get_blend_from_list

    if not values:
        return None
    try:
        blend = get_blend_from_list(list(values))
    except AssertionError:
        raise ValueError(f"{option} {' '.join(values)}: give prefixes, or weight-prefix pairs ('0.7 A 0.3 B'), not a mix") from None
    check_blend(blend, option)
    return blend


def check_blend(blend: Blend, option: str = "--data-path") -> None:
    """Refuse (ValueError naming `option`) a blend whose prefixes are not datasets written by
    wit-preprocess-data or whose weights are negative, non-finite or all 0."""
    prefixes, weights = blend
    for prefix in prefixes:
        missing = [path for path in dataset_files(prefix) if not Path(path).is_file()]
        if missing:
            raise ValueError(f"{option}: {prefix} is not a dataset written by wit-preprocess-data (missing {', '.join(missing)})")
    if weights is not None and (any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"{option}: blend weights must be finite, >= 0 and not all 0, got {weights}")


def build_datasets(config: DataConfig, train_samples: Optional[int], valid_samples: Optional[int],
                   reads_data: bool) -> tuple[Optional[torch.utils.data.Dataset], Optional[torch.utils.data.Dataset]]:
    """(train, valid) datasets on ranks that read data (`reads_data`), else (None, None). Every rank must
    call this (megatron-core's builder synchronises ranks). `train_samples` None: `train_epochs` epochs;
    `valid_samples` None: one epoch of the validation split."""
    if config.synthetic:
        if not reads_data:
            return None, None
        from wit_megatron.data.synthetic import SyntheticWITDataset

        return SyntheticWITDataset(train_samples, config.seq_length, config.synthetic_vocab_size, config.role_weights,
                                   config.seed), None
    from wit_megatron.data.dataset import WITDatasetConfig, build_datasets as build_wit_datasets

    dataset_config = WITDatasetConfig(
        random_seed=config.seed, sequence_length=config.seq_length, blend=config.blend,
        blend_per_split=config.blend_per_split, split=config.split if config.blend_per_split is None else None,
        role_weights=config.role_weights, packing=config.packing, train_epochs=config.train_epochs or 1,
        path_to_cache=config.cache_path,
    )
    train, valid, _ = build_wit_datasets(dataset_config, [train_samples, valid_samples, None], is_built_on_rank=lambda: reads_data)
    return train, valid


def agreed_length(dataset: Optional[torch.utils.data.Dataset]) -> int:
    """len(dataset) on the ranks that built it, agreed by every rank (0 where no rank has one)."""
    length = torch.tensor([len(dataset) if dataset is not None else 0], dtype=torch.int64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
    return int(length)


class PaddedDataset(torch.utils.data.Dataset):
    """`dataset` followed by all-padding samples (`dataset[None]`) up to `length`."""

    def __init__(self, dataset: torch.utils.data.Dataset, length: int):
        self.dataset, self.length, self.real = dataset, length, len(dataset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int):
        return self.dataset[idx if idx < self.real else None]


def padded_length(length: int, global_batch_size: int) -> int:
    return -(-length // global_batch_size) * global_batch_size


def micro_batches(dataset: torch.utils.data.Dataset, consumed_samples: int, total_samples: int, micro_batch_size: int,
                  num_workers: int, chunks: int = 1) -> list[Iterator[dict]]:
    """This data-parallel rank's micro-batches of samples [consumed_samples, total_samples) through
    Megatron's sampler and a DataLoader; one iterator per model chunk (virtual pipeline stages each
    read every micro-batch), all over the same reads."""
    from megatron.core import parallel_state as ps

    from wit_megatron.runtime.compat import pretraining_sampler

    sampler = pretraining_sampler(total_samples, consumed_samples, micro_batch_size, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    reads = iter(loader)
    return list(itertools.tee(reads, chunks)) if chunks > 1 else [reads]
