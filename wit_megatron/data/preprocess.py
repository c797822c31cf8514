"""Preprocess instruction data into a WIT indexed dataset (see indexed.py for the layout).

    inputs ─► sources.iter_source ─► chunks of records ─► workers: formats.parse_record, tokenize.*,
    truncation, the chunk's records written to a part dataset ─► in input order ─► parts appended to
    indexed.WITIndexedWriter (megatron-core's add_index) ─► report

Output is identical for any number of workers: chunks come back in input order (Pool.imap). With one
worker the main process encodes and writes each record itself (no parts). The main process of a
multi-worker run reads inputs, merges part files and sums each chunk's counts: only the records that
failed pass through it one by one.
A bad record raises `PreprocessError` naming its file and line, unless `on_error="skip"`, which
counts it under its reason in the report. Nothing is dropped without being counted, and a run that
writes no record at all is an error (the message says why), not an empty dataset.

The output follows the converters' rules (wit_megatron.output): a prefix whose files would overlap an
input is refused; an existing dataset is replaced only with `force` and only if this tool wrote it.
Files are written into an owned hidden staging directory next to the output (wit_megatron.staging)
and published when complete, meta.json last; a failure, SIGTERM or Ctrl-C removes the staging, and
the next run removes what a killed run left.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterator, Literal, Optional, Sequence

import numpy as np

from wit_megatron import interrupt, staging
from wit_megatron.argtypes import int_at_least, positive_int
from wit_megatron.data import indexed
from wit_megatron.data.formats import FORMATS, REASONS, FormatName, PaperRecord, RecordError, detect_format, ignored_keys, parse_record
from wit_megatron.data.indexed import WITIndexedWriter, publish, report_path, write_json
from wit_megatron.data.sources import InputError, SourceItem, SourceStats, iter_source
from wit_megatron.data.tokenize import (
    BUILTIN_TEMPLATES, TRUNCATION_POLICIES, ChatEncoder, Encoded, PaperEncoder, TruncationPolicy, added_bos_token_id, truncate,
)
from wit_megatron.data.tokenizer_identity import tokenizer_identity
from wit_megatron.output import OutputError, check_not_overlapping
from wit_megatron.roles import Role
from wit_megatron.runtime.kernels import quiet_fallback_warnings

MAX_ERROR_EXAMPLES = 20
_ROLE_NAMES = [Role(code).name.lower() for code in range(len(Role))]  # indexed by role code


class PreprocessError(ValueError):
    """A malformed record with on_error="raise" (the message names file, line and what is wrong), or a
    run that wrote no record (the message says why)."""


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    output_prefix: str
    tokenizer: str  # a local Hugging Face tokenizer directory (or a name in the offline cache)
    format: FormatName = "auto"
    chat_template: Optional[str] = None  # None: the tokenizer's own; a name of one of its templates or of BUILTIN_TEMPLATES; or a .jinja file
    append_eos: bool = True
    max_length: Optional[int] = None  # tokens per record; None keeps every record whole
    truncation: TruncationPolicy = "keep_response"
    workers: int = 1
    on_error: Literal["raise", "skip"] = "raise"
    split: Optional[str] = None  # the split of a `datasets` input with several
    chunk_size: int = 512  # records per work unit (one tokenizer batch for paper records)
    progress: bool = True
    force: bool = False  # replace an existing dataset at output_prefix (only one this tool wrote)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}: choose one of {FORMATS}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation {self.truncation!r}: choose one of {TRUNCATION_POLICIES}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error {self.on_error!r}: choose 'raise' or 'skip'")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.inputs:
            raise ValueError("no inputs given")


@dataclass
class Report:
    """What a preprocessing run did. Tokens are counted after truncation, as written."""

    records_read: int = 0
    records_written: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    truncated: int = 0
    blank_lines: int = 0
    formats: dict = field(default_factory=dict)  # paper/chat/sharegpt -> records written
    ignored_keys: dict = field(default_factory=dict)  # record key the format does not read -> records written that had it
    tokens: int = 0
    tokens_by_role: dict = field(default_factory=lambda: {r.name.lower(): 0 for r in Role})
    length_histogram: dict = field(default_factory=dict)  # "<=2^k" -> records (written lengths)
    max_length_seen: int = 0
    error_examples: list = field(default_factory=list)  # the first MAX_ERROR_EXAMPLES skipped records
    per_input: list = field(default_factory=list)
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0

    def add_written(self, outcome: _Outcome) -> None:
        n = outcome.length
        self.records_written += 1
        self.tokens += n
        self.truncated += outcome.truncated
        self.formats[outcome.fmt] = self.formats.get(outcome.fmt, 0) + 1
        for key in outcome.ignored_keys:
            self.ignored_keys[key] = self.ignored_keys.get(key, 0) + 1
        for name, count in zip(_ROLE_NAMES, outcome.role_counts):
            self.tokens_by_role[name] += count
        key = f"<={1 << max(0, (n - 1).bit_length())}"
        self.length_histogram[key] = self.length_histogram.get(key, 0) + 1
        self.max_length_seen = max(self.max_length_seen, n)

    def add_counts(self, other: Report) -> None:
        """Add the written-record counts of `other` (a chunk's, summed where it was encoded)."""
        self.records_written += other.records_written
        self.tokens += other.tokens
        self.truncated += other.truncated
        for mine, theirs in ((self.formats, other.formats), (self.ignored_keys, other.ignored_keys),
                             (self.tokens_by_role, other.tokens_by_role), (self.length_histogram, other.length_histogram)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.max_length_seen = max(self.max_length_seen, other.max_length_seen)

    def add_skipped(self, location: str, error: RecordError) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        if len(self.error_examples) < MAX_ERROR_EXAMPLES:
            self.error_examples.append(f"{location}: {error}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["length_histogram"] = dict(sorted(d["length_histogram"].items(), key=lambda kv: int(kv[0][2:])))
        d["skipped_reasons"] = {k: REASONS[k] for k in d["skipped"]}
        return d


@dataclass
class _Outcome:
    """RecordEncoder's verdict on one record: its encoding, or why it is not written."""

    location: str
    fmt: Optional[str] = None
    ignored_keys: list = field(default_factory=list)  # formats.ignored_keys of the record
    encoded: Optional[Encoded] = None
    length: int = 0  # tokens written
    role_counts: tuple = ()  # tokens written per role code
    truncated: bool = False
    error: Optional[RecordError] = None


class RecordEncoder:
    """Parse, tokenize and truncate records (runs inside each worker)."""

    def __init__(self, config: PreprocessConfig, tokenizer):
        self.config = config
        self.paper = PaperEncoder(tokenizer, append_eos=config.append_eos)
        self.tokenizer = tokenizer
        self.added_bos = added_bos_token_id(tokenizer)
        self._chat: Optional[ChatEncoder] = None

    def chat(self) -> ChatEncoder:
        if self._chat is None:  # built on first chat record: paper-only runs need no template
            self._chat = ChatEncoder(self.tokenizer, _read_template(self.config.chat_template, self.tokenizer))
        return self._chat

    def encode_chunk(self, items: list[SourceItem]) -> list[_Outcome]:
        outcomes = [_Outcome(item.location) for item in items]
        paper: list[tuple[int, PaperRecord]] = []
        for i, item in enumerate(items):
            try:
                if isinstance(item.record, RecordError):
                    raise item.record
                record = parse_record(item.record, self.config.format)
                fmt = detect_format(item.record) if self.config.format == "auto" else self.config.format
                outcomes[i].fmt, outcomes[i].ignored_keys = fmt, ignored_keys(item.record, fmt)
                if isinstance(record, PaperRecord):
                    paper.append((i, record))
                else:
                    self._finish(outcomes[i], self.chat().encode(record))
            except RecordError as e:
                outcomes[i].error = e
        if paper:
            for (i, _), encoded in zip(paper, self.paper.encode_batch([r for _, r in paper])):
                if isinstance(encoded, RecordError):
                    outcomes[i].error = encoded
                else:
                    self._finish(outcomes[i], encoded)
        return outcomes

    def _finish(self, outcome: _Outcome, encoded: Encoded) -> None:
        if len(encoded) < 2:
            outcome.error = RecordError("too_short", f"{len(encoded)} token(s)")
            return
        encoded, outcome.truncated = truncate(encoded, self.config.max_length, self.config.truncation, self.added_bos)
        if not (encoded.roles == Role.RESPONSE).any():
            outcome.error = RecordError(
                "no_response_tokens", f"truncation to {self.config.max_length} tokens ({self.config.truncation}) left no response token"
            )
            return
        outcome.encoded, outcome.length = encoded, len(encoded)
        outcome.role_counts = tuple(np.bincount(encoded.roles, minlength=len(Role)).tolist())


def _read_template(template: Optional[str], tokenizer) -> Optional[str]:
    """--chat-template as ChatEncoder takes it: None, a template name (the tokenizer's own named
    templates first, as transformers looks names up), or a file's text."""
    own = getattr(tokenizer, "chat_template", None)
    named = sorted(own) if isinstance(own, dict) else []
    if template is None or template in named or template in BUILTIN_TEMPLATES:
        return template
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    theirs = f", nor one of the tokenizer's templates ({named})" if named else ""
    raise InputError(f"--chat-template {template!r} is neither a file nor a built-in template ({sorted(BUILTIN_TEMPLATES)}){theirs}")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise InputError(f"tokenizer {name_or_path!r} cannot be loaded: {e}") from None


# Worker-process state: set before the pool forks, or by the spawn initializer.
_ENCODER: Optional[RecordEncoder] = None
_PARTS: Optional[str] = None  # directory of the workers' part datasets


def _init_worker(config: PreprocessConfig, tokenizer_path: Optional[str], parts: str) -> None:
    global _ENCODER, _PARTS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    if _ENCODER is None:
        _ENCODER = RecordEncoder(config, load_tokenizer(tokenizer_path))
    _PARTS = parts


@dataclass
class _ChunkResult:
    """What the main process needs of an encoded chunk: no per-record objects but the failures."""

    records: int  # records read
    counts: Report  # of the records written
    errors: list  # (location, RecordError) of the records not written, in input order
    part: Optional[str] = None  # the part dataset a worker wrote them to (None: none written, or no worker)
    max_token_id: int = -1  # the part's largest token id


def _encode(encoder: RecordEncoder, items: list[SourceItem]) -> tuple[_ChunkResult, list[Encoded]]:
    """Encode a chunk and count it where it runs: (its result, the records to write, in input order)."""
    result, written = _ChunkResult(len(items), Report(), []), []
    for o in encoder.encode_chunk(items):
        if o.error is not None:
            result.errors.append((o.location, o.error))
        else:
            written.append(o.encoded)
            result.counts.add_written(o)
    return result, written


def _encode_in_worker(task: tuple[int, list[SourceItem]]) -> _ChunkResult:
    """Encode chunk `index`, write its records to a part dataset of their own and count them, so that
    the main process only merges files (megatron-core's `add_index`) and chunk counts instead of
    handling every record."""
    index, items = task
    result, written = _encode(_ENCODER, items)
    if written:
        result.part = os.path.join(_PARTS, f"{index:08d}")
        writer = WITIndexedWriter(result.part, vocab_size(_ENCODER.tokenizer))
        for encoded in written:
            writer.add(encoded.ids, encoded.roles)
        writer.finalize()
        result.max_token_id = writer.max_token_id
    return result


def _encode_here(encoder: RecordEncoder, items: list[SourceItem], writer: WITIndexedWriter) -> _ChunkResult:
    """One worker: the main process encodes and writes the chunk itself."""
    result, written = _encode(encoder, items)
    for encoded in written:
        writer.add(encoded.ids, encoded.roles)
    return result


def _chunks(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    while chunk := list(islice(items, size)):
        yield chunk


def vocab_size(tokenizer) -> int:
    """Ids the model's embedding must cover: base vocabulary plus added tokens."""
    return len(tokenizer)


def check_output_prefix(config: PreprocessConfig) -> None:
    """Refuse an output prefix whose files would overlap an input (or the tokenizer directory), or that
    holds a dataset which may not be replaced (without `force`, or not written by this tool)."""
    prefix = os.path.abspath(config.output_prefix)
    inputs = [path for path in [*config.inputs, config.tokenizer] if os.path.exists(path)]
    for path in indexed.output_files(prefix):
        check_not_overlapping(path, inputs, f"--output-prefix {config.output_prefix} (its file {os.path.basename(path)})")
    existing = indexed.existing_files(prefix)
    if not existing:
        return
    names = ", ".join(os.path.basename(path) for path in existing)
    if not config.force:
        raise OutputError(f"--output-prefix {config.output_prefix} holds a dataset ({names}); pass --force to replace it")
    if not indexed.written_by_wit(prefix):
        raise OutputError(f"--force replaces only a dataset this tool wrote; {names} at --output-prefix "
                          f"{config.output_prefix} are not one: choose another prefix, or remove them yourself")


def run(config: PreprocessConfig, tokenizer=None) -> Report:
    """Preprocess `config.inputs` into `config.output_prefix`; returns (and writes) the report.

    The files are written into a hidden staging directory next to the output and moved into place
    only when complete (`indexed.publish`); a failed or interrupted run removes them."""
    check_output_prefix(config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    prefix = os.path.abspath(config.output_prefix)
    directory, name = os.path.dirname(prefix), os.path.basename(prefix)
    os.makedirs(directory, exist_ok=True)
    for line in staging.remove_stale(directory, name):
        print(line, file=sys.stderr, flush=True)
    staged_dir = staging.make(directory, name)
    try:
        with interrupt.cleanup_on_interrupt(lambda: shutil.rmtree(staged_dir, ignore_errors=True)):
            staged = os.path.join(staged_dir, name)
            report = _write(config, tokenizer, staged)
            if report.records_written == 0:
                raise PreprocessError(_nothing_written(config, report))
            with interrupt.deferred():  # an existing dataset is replaced whole, never cut in half
                publish(staged, prefix)
    finally:
        shutil.rmtree(staged_dir, ignore_errors=True)
    return report


def _nothing_written(config: PreprocessConfig, report: Report) -> str:
    """Why a run wrote no record, for the error message."""
    inputs = ", ".join(config.inputs)
    if report.records_read == 0:
        return f"{inputs}: no records to write: the input holds none ({report.blank_lines} blank line(s)); nothing was written"
    reasons = ", ".join(f"{count} {reason} ({REASONS[reason]})" for reason, count in sorted(report.skipped.items()))
    examples = "".join(f"\n  {example}" for example in report.error_examples[:3])
    return (f"{inputs}: none of the {report.records_read} records could be written: skipped {reasons}; nothing was "
            f"written{examples}")


def _write(config: PreprocessConfig, tokenizer, prefix: str) -> Report:
    global _ENCODER
    from tqdm import tqdm

    encoder = RecordEncoder(config, tokenizer)
    report = Report()
    writer = WITIndexedWriter(prefix, vocab_size(tokenizer))
    start = time.perf_counter()
    pool, parts = None, None
    if config.workers > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _ENCODER = encoder if method == "fork" else None  # forked workers inherit the loaded tokenizer
        parts = tempfile.mkdtemp(prefix=f"{os.path.basename(prefix)}.parts-", dir=os.path.dirname(prefix))
        # megatron-core's add_index runs gc.collect() per part: over the heap of a process holding
        # transformers and a tokenizer that is ~0.2 s each. Frozen objects are not scanned (and the
        # forked workers share their pages untouched).
        gc.freeze()
        ctx = multiprocessing.get_context(method)
        pool = ctx.Pool(config.workers, initializer=_init_worker, initargs=(config, config.tokenizer, parts))
    try:
        with tqdm(desc="records", unit=" rec", disable=not config.progress, file=sys.stderr) as bar:
            for path in config.inputs:
                stats = SourceStats()
                before = (report.records_read, report.records_written)
                chunks = _chunks(iter_source(path, config.split, stats), config.chunk_size)
                if pool:  # in input order; each chunk's records already written to a part by its worker
                    results = pool.imap(_encode_in_worker, enumerate(chunks))
                else:
                    results = (_encode_here(encoder, chunk, writer) for chunk in chunks)
                for result in results:
                    for location, error in result.errors:
                        if config.on_error == "raise":
                            raise PreprocessError(f"{location}: {error}\n(use --on-error skip to count and skip such records)")
                        report.add_skipped(location, error)
                    report.records_read += result.records
                    report.add_counts(result.counts)
                    if result.part is not None:
                        writer.append_part(result.part, result.max_token_id)
                    bar.update(result.records)
                report.blank_lines += stats.blank_lines
                report.per_input.append({
                    "input": path,
                    "records_read": report.records_read - before[0],
                    "records_written": report.records_written - before[1],
                })
    finally:
        if pool is not None:
            pool.terminate()
        if parts is not None:
            shutil.rmtree(parts, ignore_errors=True)
            gc.unfreeze()
        _ENCODER = None
    report.elapsed_s = time.perf_counter() - start
    report.tokens_per_s = report.tokens / report.elapsed_s if report.elapsed_s > 0 else 0.0
    writer.finalize({
        "tokenizer": config.tokenizer,
        **tokenizer_identity(tokenizer),  # vocab_size, special ids, fingerprint: compared with the model's at training
        "added_bos_token_id": encoder.added_bos,  # kept in front of a left cut, here and at load time
        "append_eos": config.append_eos,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "records": report.records_written,
    })
    write_json(report_path(prefix), report.as_dict())
    return report


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wit-preprocess-data",
        description="Instruction data (paper prompt/response, chat messages, ShareGPT) -> Megatron indexed "
        "datasets of token ids and per-token role codes, for WIT's load-time λ weights.",
    )
    p.add_argument("--input", nargs="+", required=True, help=".jsonl[.gz], .json, .parquet, a saved `datasets` dir, or an offline dataset name")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_tokens.bin/.idx, PREFIX_roles.bin/.idx, PREFIX.meta.json, PREFIX.report.json")
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    p.add_argument("--format", choices=FORMATS, default="auto", help="record format (default: detected per record)")
    p.add_argument("--chat-template", default=None, help=f"Jinja template file, the name of one of the tokenizer's templates (if it has several), or built-in name "
                   f"{sorted(BUILTIN_TEMPLATES)} (default: the tokenizer's, its 'default' one or for records with tools its 'tool_use' one)")
    p.add_argument("--no-append-eos", dest="append_eos", action="store_false", help="paper format: do not append EOS to the response")
    p.add_argument("--max-length", type=int_at_least(2), default=None,
                   help="truncate records to this many tokens (use the training seq length + 1); default: no truncation "
                   "here (the dataset cuts records longer than its sequence length + 1 at load time, by its own truncation setting)")
    p.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="keep_response",
                   help="keep_response: cut the prompt from the left, keep the response (default); right: the paper's plain right truncation")
    p.add_argument("--workers", type=positive_int, default=1, help="tokenizing processes (default 1); output is identical for any number")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="raise (default): stop at the first malformed record, naming its file and line (exit 1); skip: count "
                   "it under its reason in the report and go on. An unreadable input, tokenizer or template exits 2")
    p.add_argument("--split", default=None, help="split of a `datasets` input that has several (default: its only split)")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="records per work unit and tokenizer batch (default 512)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset at --output-prefix (only one this tool wrote)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = vars(build_arg_parser().parse_args(argv))
    config = PreprocessConfig(inputs=args.pop("input"), **args)
    quiet_fallback_warnings()
    interrupt.die_with_parent()
    try:
        with interrupt.stop_on_signals(f"the dataset {config.output_prefix}"):
            report = run(config)
    except PreprocessError as e:  # a malformed record, or no record written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (InputError, OutputError) as e:  # an input, tokenizer or template that cannot be read; an output refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = sum(report.skipped.values())
    print(
        f"wrote {report.records_written} of {report.records_read} records ({report.tokens} tokens, "
        f"{report.tokens_by_role['response']} response) to {config.output_prefix}_{{tokens,roles}}.bin/.idx; "
        f"skipped {skipped} {report.skipped or ''}; truncated {report.truncated}; "
        f"{report.tokens_per_s:,.0f} tokens/s; report: {report_path(config.output_prefix)}",
        file=sys.stderr,
    )
    return 0
