"""The WIT dataset: a megatron-core MegatronDataset over preprocessed tokens + role codes.

Built by megatron-core's BlendedMegatronDatasetBuilder (`build_datasets`), so blends with weights,
train/valid/test splits, seeds and index caching behave as in Megatron. λ is applied here, at load
time, from the stored role codes: one preprocessing run serves a whole λ sweep, and the cached
sample index does not depend on λ.

A sample is a dict of 1-D tensors of length s = sequence_length:
    tokens        int64    input ids
    labels        int64    target ids (each record's ids shifted by one)
    loss_mask     float32  1 on real targets, 0 on padding
    loss_weights  float32  λ[role of the target token], 0 on padding
    response_mask bool     the target is a response token
    position_ids  int64    0, 1, ... restarting at each record
    document_ids  int64    (packing only) index of the record within the sequence, -1 on padding

A record of n tokens fills n - 1 positions (its last token is only a target, its first only an input).
Packing (default) puts several records in one sequence, best-fit decreasing per epoch; attention is
isolated per record from `document_ids` (batch.packed_attention_mask / packed_seq_params), so each
token's loss equals its loss unpacked. Without packing a sample is one record and causal attention
needs no mask. Records longer than s + 1 tokens are cut at load time by `truncation`
(tokenize.truncation_window, the same rule as preprocessing: a leading BOS is kept, and a record left
without a response target is dropped and counted in `stats["records_dropped_no_response"]`).

Sample order is a pure function of (seed, split, sequence_length, packing, truncation, num_samples,
train_epochs) and the data: the same on every run, and sample i is the same whether or not training
resumed before it.
The cached index is keyed by all of these, the data by WITIndexedData.identity (the uuid each
preprocessing run writes, and the record and token counts), so a prefix preprocessed again gets a new index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from wit_megatron.data.assemble import assemble_sample
from wit_megatron.data.indexed import WITIndexedData
from wit_megatron.data.tokenize import TRUNCATION_POLICIES, TruncationPolicy, truncation_window
from wit_megatron.roles import Role, RoleWeights

logger = logging.getLogger(__name__)

_RESPONSE = int(Role.RESPONSE)


@dataclass
class WITDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus WIT's load-time settings (`blend` prefixes are preprocessing
    output prefixes)."""

    role_weights: Optional[RoleWeights] = None
    """λ per role; required. Not part of the index cache key: a λ sweep reuses one index."""

    packing: bool = True
    """Several records per sequence, attention isolated per record."""

    truncation: TruncationPolicy = "keep_response"
    """How records longer than sequence_length + 1 tokens are cut at load time."""

    pad_token_id: int = 0
    """Input/label id written on padding positions (always masked out of the loss)."""

    train_epochs: int = 1
    """Epochs in the train split when it is built without a sample count (num_samples None, e.g.
    Megatron's builder for an unweighted blend of size None); other splits hold one epoch."""

    index_cache_dir: Optional[str] = None
    """Where WITDataset caches its sample index; default: path_to_cache, else `cache/` next to the data."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mock:
            raise ValueError("WITDatasetConfig needs `blend` or `blend_per_split` (preprocessed prefixes); there is no mock WIT data")
        if not isinstance(self.role_weights, RoleWeights):
            raise TypeError(f"role_weights must be a wit_megatron.roles.RoleWeights, got {self.role_weights!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation {self.truncation!r}: choose one of {TRUNCATION_POLICIES}")
        if self.train_epochs < 1:
            raise ValueError(f"train_epochs must be >= 1, got {self.train_epochs}")
        if self.sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {self.sequence_length}")


class WITDataset(MegatronDataset):
    """Samples of one preprocessed prefix and split (see the module docstring for their layout)."""

    def __init__(
        self,
        dataset: WITIndexedData,
        dataset_path: Optional[str],
        indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: WITDatasetConfig,
    ) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        # Megatron's key names the data by its path only, but a prefix can be preprocessed again with
        # other records: keyed by the data's identity too, new data never reads an old index's offsets.
        self.unique_identifiers["data"] = dataset.identity
        self.unique_description = json.dumps(self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"), usedforsecurity=False).hexdigest()
        self.data = dataset
        self.seq_length = config.sequence_length
        self.weight_of_role = np.zeros(256, dtype=np.float32)  # every uint8 code: assemble_sample does not bounds-check
        self.weight_of_role[: len(Role)] = config.role_weights.table().numpy()
        index = self._load_or_build_index()
        self.sample_offsets = index["sample_offsets"]  # [num_samples + 1] into sample_records
        self.sample_records = index["sample_records"]  # record ids, sample after sample
        # Per record of the low-level dataset, after load-time truncation (flat indices into data.tokens):
        self.record_target = index["record_target"]  # [len(data)] its first kept target
        self.record_input = index["record_input"]  # [len(data)] the input before that target (token 0 or the cut's)
        self.record_size = index["record_size"]  # [len(data)] targets kept (positions filled); 0 = dropped
        self._no_records = self.sample_records[:0]
        self[None]  # compiles assemble_sample for these dtypes here, before data loader workers fork
        self.stats = self._stats()
        logger.info("%s %s: %s", type(self).__name__, index_split.name, self.stats)
        if self.stats["records_dropped_no_response"]:
            logger.warning("%s: %d records longer than %d tokens keep no response target under truncation %r and are left out",
                           self.dataset_path, self.stats["records_dropped_no_response"], self.seq_length + 1, self.config.truncation)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: WITIndexedData) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: WITDatasetConfig) -> WITIndexedData:
        return WITIndexedData(dataset_path, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split", "split_matrix", "packing", "truncation", "train_epochs"]

    def __len__(self) -> int:
        return len(self.sample_offsets) - 1

    def __getitem__(self, idx: Optional[int]) -> dict[str, torch.Tensor]:
        """Sample `idx`; None gives an all-padding sample (Megatron's batch padding)."""
        return self.assemble(self.records_of(idx))

    def records_of(self, idx: Optional[int]) -> np.ndarray:
        """The records (ids in the low-level dataset) of sample `idx`, in their order in the sequence."""
        return self._no_records if idx is None else self.sample_records[self.sample_offsets[idx] : self.sample_offsets[idx + 1]]

    def assemble(self, records: np.ndarray) -> dict[str, torch.Tensor]:
        """The sample holding `records` in this order (each kept as load-time truncation keeps it)."""
        s = self.seq_length
        records = np.asarray(records, dtype=self.sample_records.dtype)  # one compiled assembly per dtype
        sample = {
            "tokens": np.empty(s, dtype=np.int64),
            "labels": np.empty(s, dtype=np.int64),
            "loss_mask": np.empty(s, dtype=np.float32),
            "loss_weights": np.empty(s, dtype=np.float32),
            "response_mask": np.empty(s, dtype=np.bool_),
            "position_ids": np.empty(s, dtype=np.int64),
            "document_ids": np.empty(s, dtype=np.int64),
        }
        assemble_sample(records, self.record_target, self.record_input, self.record_size, self.data.tokens, self.data.roles,
                        self.weight_of_role, _RESPONSE, self.config.pad_token_id, *sample.values())
        if not self.config.packing:
            del sample["document_ids"]
        return {key: torch.from_numpy(array) for key, array in sample.items()}

    # ---- the sample index ----------------------------------------------------------------

    def _windows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per record (all of the low-level dataset): flat index of its first kept target and of the
        input before it, and the number of targets kept (0: dropped, no response target left)."""
        lengths, starts = self.data.lengths, self.data.starts
        lead = np.zeros(len(lengths), dtype=np.int64)
        start = np.ones(len(lengths), dtype=np.int64)
        end = lengths.copy()
        bos = self.data.meta["added_bos_token_id"]
        for record in np.flatnonzero(lengths[self.indices] > self.seq_length + 1):
            record = self.indices[record]
            ids, roles = self.data.get(record)
            roles = np.asarray(roles)
            keep_first = bos is not None and int(ids[0]) == bos
            lead[record], start[record], end[record] = truncation_window(roles, self.seq_length + 1, self.config.truncation, keep_first)
            if not (roles[start[record] : end[record]] == _RESPONSE).any():  # as preprocessing: never a record without response
                end[record] = start[record]
        return starts + start, starts + lead, end - start

    def _build_index(self) -> dict[str, np.ndarray]:
        if np.any(self.data.lengths[self.indices] < 2):
            bad = self.indices[np.flatnonzero(self.data.lengths[self.indices] < 2)[0]]
            raise ValueError(f"{self.dataset_path}: record {bad} has fewer than 2 tokens")
        record_target, record_input, sizes = self._windows()
        kept = self.indices[sizes[self.indices] > 0]
        rng = np.random.RandomState(self.config.random_seed)
        samples: list[np.ndarray] = []
        epochs = self.config.train_epochs if self.index_split == Split.train else 1
        for epoch in itertools.count(1):  # one epoch per pass: every record once, in a fresh order
            order = kept[rng.permutation(len(kept))]
            if self.config.packing:
                bins = _best_fit_decreasing(order, sizes, self.seq_length)
                samples.extend(bins[i] for i in rng.permutation(len(bins)))
            else:
                samples.extend(order[:, None])
            if not len(kept) or (len(samples) >= self.num_samples if self.num_samples is not None else epoch == epochs):
                break
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in samples], out=offsets[1:])
        records = np.concatenate(samples).astype(np.int32) if samples else np.zeros(0, dtype=np.int32)
        return {"sample_offsets": offsets, "sample_records": records, "record_target": record_target,
                "record_input": record_input, "record_size": sizes}

    def _cache_dir(self) -> str:
        for directory in (self.config.index_cache_dir, self.config.path_to_cache):
            if directory:
                return directory
        return os.path.join(os.path.dirname(os.path.abspath(self.dataset_path)), "cache", f"{type(self).__name__}_indices")

    def _load_or_build_index(self) -> dict[str, np.ndarray]:
        """Megatron's caching scheme: files named by the hash of the unique description; rank 0 writes,
        the others read after the builder's barrier. A rank that finds no cache builds the same index
        itself (it is deterministic) rather than fail."""
        base = os.path.join(self._cache_dir(), f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        names = ("sample_offsets", "sample_records", "record_target", "record_input", "record_size")
        paths = {name: f"{base}-{name}.npy" for name in names}
        if all(os.path.isfile(p) for p in paths.values()) and os.path.isfile(f"{base}-description.txt"):
            # Plain ndarray views of the maps: indexing a np.memmap costs ~2 us a call, a third of a sample.
            return {name: np.asarray(np.load(path, mmap_mode="r")) for name, path in paths.items()}
        index = self._build_index()
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            os.makedirs(self._cache_dir(), exist_ok=True)
            for name, path in paths.items():
                tmp = f"{path}.tmp{os.getpid()}"  # not *.npy: other ranks' check_cached_indices must not see it half written
                with open(tmp, "wb") as f:
                    np.save(f, index[name])
                os.replace(tmp, path)
            with open(f"{base}-description.txt", "w") as f:  # written last: marks the cache complete
                f.write(self.unique_description)
        return index

    def _stats(self) -> dict:
        sizes = self.record_size[self.sample_records]
        lengths = self.data.lengths[self.indices]
        total = max(1, len(self) * self.seq_length)
        return {
            "samples": len(self),
            "records": len(self.indices),
            "records_per_sample": round(len(self.sample_records) / max(1, len(self)), 3),
            "padding_fraction": round(1.0 - float(sizes.sum()) / total, 6),
            "records_truncated": int((lengths > self.seq_length + 1).sum()),
            "records_dropped_no_response": int((self.record_size[self.indices] == 0).sum()),
        }


def _best_fit_decreasing(records: np.ndarray, sizes: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Pack `records` (sizes[record] positions each, all <= capacity) into bins of `capacity`:
    largest first, each into the open bin it fills most tightly. Ties keep the order of `records`,
    so a seeded order gives a deterministic packing. Returns the bins' record arrays."""
    order = records[np.argsort(-sizes[records], kind="stable")]
    bins: list[list[int]] = []
    open_by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> open bins
    has_room = np.zeros(capacity + 1, dtype=bool)
    for record in order.tolist():
        size = int(sizes[record])
        fits = np.flatnonzero(has_room[size:])
        if len(fits):
            room = size + int(fits[0])
            b = open_by_room[room].pop()
            has_room[room] = bool(open_by_room[room])
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(record)
        left = room - size
        if left > 0:
            open_by_room[left].append(b)
            has_room[left] = True
    return [np.asarray(x, dtype=np.int64) for x in bins]


def check_cached_indices(directory: str) -> None:
    """Refuse cached blend indices megatron-core would unpickle: its BlendedDataset loads
    `PATH_TO_CACHE/*.npy` with `numpy.load(allow_pickle=True)` (0.16; 0.19 through a restricted
    unpickler), which runs whatever a file there that is not a plain array names. The cache directory
    is the user's (--data-cache-path), possibly shared or copied with the data. Other ranks may be
    writing there meanwhile: a file gone before it is read, or still empty, holds nothing to unpickle."""
    for path in sorted(Path(directory).glob("*.npy")):
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                continue
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                dtype = read_header[version](f)[2]
            except (ValueError, KeyError, EOFError):
                raise ValueError(f"{path}: not a plain NumPy array, as megatron-core's cached indices are; refused "
                                 "without loading it (megatron-core would unpickle it): remove it to rebuild the cache") from None
        if dtype.hasobject:
            raise ValueError(f"{path}: a NumPy array of Python objects, not cached indices; refused without loading it "
                             "(megatron-core would unpickle it): remove it to rebuild the cache")


def build_datasets(
    config: WITDatasetConfig,
    sizes: Sequence[Optional[int]],
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> list[Optional[torch.utils.data.Dataset]]:
    """[train, valid, test] datasets (None for an empty split) through megatron-core's builder.
    `sizes`: samples wanted per split (None: one epoch)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from wit_megatron.runtime import compat

    if config.path_to_cache:
        check_cached_indices(config.path_to_cache)
    if config.path_to_cache and not torch.distributed.is_initialized() and not compat.blended_dataset_caches_without_process_group():
        # This megatron-core cannot cache blend indices without a process group: keep caching the
        # WIT sample indices, rebuild the (cheap) blend indices each time.
        logger.info("megatron-core %s: blend indices are not cached in a process without torch.distributed", compat.megatron_core_version())
        config = dataclasses.replace(config, path_to_cache=None, index_cache_dir=config.index_cache_dir or config.path_to_cache)
    return BlendedMegatronDatasetBuilder(WITDataset, list(sizes), is_built_on_rank, config).build()
