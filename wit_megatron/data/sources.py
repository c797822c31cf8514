"""Read raw records from input files, each with a location that error messages can name.

    *.jsonl (.gz)         read line by line (streaming); location "file:LINE"; a line that is not
                          JSON becomes a `malformed_json` record error, blank lines are counted
    *.json                a JSON array of records; location "file[INDEX]"
    *.parquet             through `datasets` (streaming); location "file#row INDEX"
    a saved `datasets` directory (save_to_disk), or a dataset name in the offline Hugging Face cache:
                          through `datasets`; location "name#row INDEX"

Yields `SourceItem`s: either a decoded object or the RecordError that prevented decoding.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from wit_megatron.data.formats import RecordError


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
        raise ValueError(f"{path}: unsupported input; expected .jsonl, .jsonl.gz, .json, .parquet or a saved `datasets` directory")
    else:
        yield from _hf_rows(path, _load_named(path, split))


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _jsonl(path: str, stats: SourceStats) -> Iterator[SourceItem]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                stats.blank_lines += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = RecordError("malformed_json", f"{e.msg} at column {e.colno}")
            yield SourceItem(f"{path}:{lineno}", obj)


def _json_array(path: str) -> Iterator[SourceItem]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json input must be one JSON array") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json input must hold a JSON array of records, found a {type(data).__name__} (use .jsonl for one record per line)")
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
    import datasets

    try:
        data = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise FileNotFoundError(
            f"{name!r} is neither a file nor a directory, and `datasets` cannot load it offline: {type(e).__name__}: {e}"
        ) from None
    return _pick_split(name, data, split)


def _pick_split(name: str, data, split: Optional[str]):
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    if split is None:
        if len(data) != 1:
            raise ValueError(f"{name} has splits {sorted(data)}: choose one with --split")
        split = next(iter(data))
    if split not in data:
        raise ValueError(f"{name} has no split {split!r}; it has {sorted(data)}")
    return data[split]


def _hf_rows(name: str, rows) -> Iterator[SourceItem]:
    for i, row in enumerate(rows):
        yield SourceItem(f"{name}#row {i}", row)
