"""On-disk layout of a preprocessed WIT dataset: two Megatron-Core IndexedDatasets, document-aligned.

For an output prefix P:
    P_tokens.bin/.idx   token ids (uint16 when the vocabulary fits, else int32), one sequence per record
    P_roles.bin/.idx    one uint8 role code (wit_megatron.roles.Role) per token, same sequence lengths
    P.meta.json         tokenizer facts (data/tokenizer_identity.py: vocabulary size, special ids, a
                        fingerprint; training compares them with the checkpoint's tokenizer), the
                        largest token id, preprocessing settings the dataset checks at load time, and
                        `dataset_uuid`, new at every preprocessing run (it keys the dataset's index cache);
                        written last: a prefix without it is not a complete dataset
    P.report.json       what preprocessing read, wrote, skipped and why (see preprocess.Report)

Both IndexedDatasets are written with megatron-core's own IndexedDatasetBuilder, so Megatron's tools
(and GPTDataset, for the tokens alone) read them as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Optional

import numpy as np
import torch

from wit_megatron.roles import Role

META_VERSION = 2  # 2: added_bos_token_id (load-time truncation keeps only a BOS the tokenizer added)
TOKENS_SUFFIX = "_tokens"
ROLES_SUFFIX = "_roles"


def role_codes() -> dict[str, int]:
    return {r.name.lower(): int(r) for r in Role}


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def report_path(prefix: str) -> str:
    return f"{prefix}.report.json"


def dataset_files(prefix: str) -> list[str]:
    """The files a preprocessed dataset at `prefix` is read from."""
    return [prefix + part + ext for part in (TOKENS_SUFFIX, ROLES_SUFFIX) for ext in (".bin", ".idx")] + [meta_path(prefix)]


class WITIndexedWriter:
    """Append records (ids + roles) to the token and role IndexedDatasets of one output prefix."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path

        # The directory must exist: never created here, so that a preprocessing worker the pool starts
        # after SIGTERM removed the staging cannot bring the staging back (its write fails instead).
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.max_token_id = -1  # of the records added here (parts appended report theirs in their meta)
        self.token_dtype = DType.optimal_dtype(vocab_size)
        self._tokens = IndexedDatasetBuilder(get_bin_path(prefix + TOKENS_SUFFIX), dtype=self.token_dtype)
        self._roles = IndexedDatasetBuilder(get_bin_path(prefix + ROLES_SUFFIX), dtype=np.uint8)

    def add(self, ids: np.ndarray, roles: np.ndarray) -> None:
        """One record: ids [n] int, roles [n] uint8; one document of one sequence in both datasets."""
        if len(ids) != len(roles):
            raise ValueError(f"{len(ids)} ids but {len(roles)} role codes")
        if len(ids) and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))
        self._tokens.add_item(torch.from_numpy(np.ascontiguousarray(ids)))
        self._tokens.end_document()
        self._roles.add_item(torch.from_numpy(np.ascontiguousarray(roles, dtype=np.uint8)))
        self._roles.end_document()

    def append_part(self, part: str, max_token_id: int) -> None:
        """Append the records of another writer's finalized output `part` (same vocabulary; its largest
        id `max_token_id`) with megatron-core's `add_index`, then delete the part's files."""
        from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

        self.max_token_id = max(self.max_token_id, max_token_id)
        for builder, suffix in ((self._tokens, TOKENS_SUFFIX), (self._roles, ROLES_SUFFIX)):
            builder.add_index(part + suffix)
            os.remove(get_bin_path(part + suffix))
            os.remove(get_idx_path(part + suffix))

    def finalize(self, meta: Optional[dict] = None) -> None:
        """Write both index files and, with `meta`, the dataset's meta.json (a part has none)."""
        from megatron.core.datasets.indexed_dataset import get_idx_path

        self._tokens.finalize(get_idx_path(self.prefix + TOKENS_SUFFIX))
        self._roles.finalize(get_idx_path(self.prefix + ROLES_SUFFIX))
        if meta is not None:
            meta = dict(meta, version=META_VERSION, vocab_size=self.vocab_size, max_token_id=self.max_token_id,
                        role_codes=role_codes(), token_dtype=np.dtype(self.token_dtype).name, dataset_uuid=uuid.uuid4().hex)
            write_json(meta_path(self.prefix), meta)


def output_files(prefix: str) -> list[str]:
    """The files of a preprocessed dataset, meta.json (the mark of a complete dataset) last."""
    return [prefix + TOKENS_SUFFIX + ".bin", prefix + TOKENS_SUFFIX + ".idx", prefix + ROLES_SUFFIX + ".bin",
            prefix + ROLES_SUFFIX + ".idx", report_path(prefix), meta_path(prefix)]


def existing_files(prefix: str) -> list[str]:
    """The files of a dataset at `prefix` that exist (any of them: a dataset, or what is left of one)."""
    return [path for path in output_files(prefix) if os.path.lexists(path)]


def written_by_wit(prefix: str) -> bool:
    """Whether the files at `prefix` are (what is left of) a dataset wit-preprocess-data wrote: its
    meta.json or its report, one of which survives an interrupted replacement (`publish`)."""
    for path, key in ((meta_path(prefix), "dataset_uuid"), (report_path(prefix), "records_written")):
        try:
            with open(path) as f:
                if key in json.load(f):
                    return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def publish(staged_prefix: str, prefix: str) -> None:
    """Move a complete dataset written under `staged_prefix` (same directory) to `prefix`. The files
    are synced first; an existing dataset at `prefix` loses its meta.json before any file is replaced,
    and the new meta.json comes last, so that an interruption never leaves a mix that loads."""
    for path in output_files(staged_prefix):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(meta_path(prefix)):
        os.remove(meta_path(prefix))
    for staged, final in zip(output_files(staged_prefix), output_files(prefix)):
        os.replace(staged, final)
    directory = os.open(os.path.dirname(os.path.abspath(prefix)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class WITIndexedData:
    """The low-level dataset of one prefix: tokens and roles side by side, checked to be aligned.

    `tokens` and `roles` are flat arrays over all records (record i occupies [starts[i], starts[i] +
    lengths[i])), which the dataset gathers from without per-record reads: memory maps of the .bin
    files, or with mmap=False (Megatron's `mmap_bin_files`) their contents read into memory.
    """

    def __init__(self, prefix: str, mmap: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        if not os.path.isfile(meta_path(prefix)):
            raise FileNotFoundError(f"{meta_path(prefix)} not found: is {prefix!r} the output prefix of tools/preprocess_wit_data.py?")
        with open(meta_path(prefix)) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != META_VERSION:
            raise ValueError(f"{meta_path(prefix)}: written by another wit-megatron version (meta version "
                             f"{self.meta.get('version')}, this one reads {META_VERSION}); preprocess again")
        if self.meta.get("role_codes") != role_codes():
            raise ValueError(f"{prefix}: role codes {self.meta.get('role_codes')} differ from this version's {role_codes()}; preprocess again")
        if self.meta.get("records") == 0:  # megatron-core cannot even map its empty .bin files
            raise ValueError(f"{prefix}: the dataset holds no records ({meta_path(prefix)}); preprocess data with records into it")
        try:
            self.token_data = IndexedDataset(prefix + TOKENS_SUFFIX, mmap=mmap)
            self.role_data = IndexedDataset(prefix + ROLES_SUFFIX, mmap=mmap)
        except (OSError, ValueError, AssertionError) as e:  # megatron-core's reader names no file
            raise ValueError(f"{prefix}: unreadable {TOKENS_SUFFIX}/{ROLES_SUFFIX} .bin/.idx files "
                             f"({type(e).__name__}: {e})") from None
        self.lengths = np.asarray(self.token_data.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, self.role_data.sequence_lengths):
            raise ValueError(f"{prefix}: token and role datasets are not aligned (different sequence lengths)")
        self.starts = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=self.starts[1:])
        total = int(self.lengths.sum())
        self.tokens = _flat(prefix + TOKENS_SUFFIX, self.token_data.index.dtype, total, mmap)
        self.roles = _flat(prefix + ROLES_SUFFIX, np.uint8, total, mmap)
        self.identity = {"records": len(self.lengths), "tokens": total, **self._content_id()}

    def _content_id(self) -> dict[str, str]:
        """What tells this prefix's data from other data once written there: the uuid preprocessing
        writes into meta.json (a new one every run, so exact and free to read). A meta.json without
        it (written before it existed) falls back to a digest of both .idx files and the meta.json,
        which changes with any record length or preprocessing setting, though not with role codes
        alone (hashing the .bin files would, at the cost of reading all the data)."""
        if "dataset_uuid" in self.meta:
            return {"dataset_uuid": self.meta["dataset_uuid"]}
        from megatron.core.datasets.indexed_dataset import get_idx_path

        digest = hashlib.md5(usedforsecurity=False)
        for path in (get_idx_path(self.prefix + TOKENS_SUFFIX), get_idx_path(self.prefix + ROLES_SUFFIX), meta_path(self.prefix)):
            with open(path, "rb") as f:
                digest.update(f.read())
        return {"index_md5": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n], roles [n]) of record i."""
        s, n = self.starts[i], self.lengths[i]
        return self.tokens[s : s + n], self.roles[s : s + n]


def _flat(path_prefix: str, dtype, count: int, mmap: bool) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import get_bin_path

    path = get_bin_path(path_prefix)
    expected = count * np.dtype(dtype).itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, its index describes {expected}")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    if not mmap:  # no map of the .bin, as megatron-core's file reader; the gathers need it whole in memory
        return np.fromfile(path, dtype=dtype, count=count)
    # A plain ndarray view of the map: slicing it is several times cheaper than slicing a np.memmap.
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=(count,)))
