"""Read raw records from input files, each with a location that error messages can name.

    *.jsonl (.gz)         read line by line (streaming); location "file:LINE"; a line that is not
                          UTF-8 JSON becomes a `malformed_json` record error, blank lines are counted
    *.json                a JSON array of records; location "file[INDEX]"
    *.parquet             through `datasets` (streaming); location "file#row INDEX"
    a saved `datasets` directory (save_to_disk), or a dataset name in the offline Hugging Face cache:
                          through `datasets`; location "name#row INDEX"

Yields `SourceItem`s: either a decoded object or the RecordError that prevented decoding. An input
that cannot be read at all raises `InputError` naming it.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from wit_megatron.data.formats import RecordError


class InputError(ValueError):
    """An input that cannot be read as a whole (missing, unsupported, not a JSON array, corrupt)."""


@dataclass
class SourceItem:
    location: str
    record: Union[Any, RecordError]


@dataclass
class SourceStats:
    blank_lines: int = 0


def iter_source(path: str, split: Optional[str] = None, stats: Optional[SourceStats] = None) -> Iterator[SourceItem]:
    """Every record of one input, in file order."""
    stats = stats if stats is not None else SourceStats()
    name = path[:-3] if path.endswith(".gz") else path
    if os.path.isfile(path) and name.endswith(".jsonl"):
        yield from _jsonl(path, stats)
    elif os.path.isfile(path) and name.endswith(".json"):
        yield from _json_array(path)
    elif os.path.isfile(path) and path.endswith(".parquet"):
        yield from _hf_rows(path, _load_parquet(path))
    elif os.path.isdir(path):
        yield from _hf_rows(path, _load_saved(path, split))
    elif os.path.exists(path):
        raise InputError(f"{path}: unsupported input; expected .jsonl, .jsonl.gz, .json, .parquet or a saved `datasets` directory")
    else:
        yield from _hf_rows(path, _load_named(path, split))


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl(path: str, stats: SourceStats) -> Iterator[SourceItem]:
    # Bytes, decoded line by line: a line that is not UTF-8 is that record's error, not the file's.
    with _open_binary(path) as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    stats.blank_lines += 1
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    obj = RecordError("malformed_json", f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                except json.JSONDecodeError as e:
                    obj = RecordError("malformed_json", f"{e.msg} at column {e.colno}")
                yield SourceItem(f"{path}:{lineno}", obj)
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            raise InputError(f"{path}: cannot be read after line {lineno}: {e}") from None


def _json_array(path: str) -> Iterator[SourceItem]:
    with _open_binary(path) as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json input must be one JSON array") from None
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: cannot be read: {e}") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json input must hold a JSON array of records, found a {type(data).__name__} (use .jsonl for one record per line)")
    for i, obj in enumerate(data):
        yield SourceItem(f"{path}[{i}]", obj)


def _load_parquet(path: str):
    import datasets

    return datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)


def _load_saved(path: str, split: Optional[str]):
    import datasets

    data = datasets.load_from_disk(path)
    return _pick_split(path, data, split)


def _load_named(name: str, split: Optional[str]):
    """A dataset name, from the local `datasets` cache only: never from the network."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        data = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise InputError(
            f"{name!r} is neither a file nor a directory, and `datasets` cannot load it offline: {type(e).__name__}: {e}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return _pick_split(name, data, split)


def _pick_split(name: str, data, split: Optional[str]):
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    if split is None:
        if len(data) != 1:
            raise InputError(f"{name} has splits {sorted(data)}: choose one with --split")
        split = next(iter(data))
    if split not in data:
        raise InputError(f"{name} has no split {split!r}; it has {sorted(data)}")
    return data[split]


def _hf_rows(name: str, rows) -> Iterator[SourceItem]:
    for i, row in enumerate(rows):
        yield SourceItem(f"{name}#row {i}", row)
