"""Where the tools may write: an output that appears whole or not at all and replaces only what it may replace.

The rules the converters follow for their output directory (the preprocessing tool follows the same
for its output prefix, wit_megatron.data.preprocess):
- `--out` equal to, inside, or containing an input is refused: writing there would destroy the input
  (with --force, the replacement deletes the old directory and everything in it).
- An existing `--out` is refused unless --force; --force replaces only an empty directory or one this
  tool recognisably wrote (`OutputKind.written_by_us`), never anything else.
- The output is written into an owned hidden staging directory (wit_megatron.staging) next to it,
  synced, and renamed into place when complete; a failure or interruption removes the staging and
  leaves an existing output as it was. Staging that a killed run left is removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from wit_megatron import interrupt, staging
from wit_megatron.checkpoint import fsync, sync_tree


class OutputError(ValueError):
    """An output location that may not be written (it overlaps an input, or exists and may not be replaced)."""


@dataclass(frozen=True)
class OutputKind:
    """What a tool writes, and how to recognise a directory it wrote (the only kind --force replaces)."""

    what: str  # e.g. "Megatron checkpoint"
    written_by_us: Callable[[Path], bool]


def check_output(out: Path, force: bool, inputs: Sequence[Path], kind: OutputKind) -> None:
    """Refuse an `out` that overlaps an input, or that exists and may not be replaced (see the module doc)."""
    out = Path(out)
    check_not_overlapping(out, inputs, f"--out {out}")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    if not force:
        raise OutputError(f"output directory {out} exists; pass --force to replace it")
    if any(out.iterdir()) and not kind.written_by_us(out):
        raise OutputError(
            f"--force replaces only a {kind.what} this tool wrote; {out} is not one (it holds {_listing(out)}): "
            "choose another --out, or remove it yourself")


def check_not_overlapping(out: Path, inputs: Sequence[Path], label: str) -> None:
    """Refuse an output path equal to, inside, or containing one of `inputs` (symbolic links resolved).
    `label` names the output in the message (e.g. "--out OUT")."""
    target = Path(os.path.realpath(out))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if target == source:
            raise OutputError(f"{label} is the input {given}: writing it would destroy the input")
        if source in target.parents:
            raise OutputError(f"{label} lies inside the input {given}: write it elsewhere")
        if target in source.parents:
            raise OutputError(f"{label} contains the input {given}: replacing it would delete the input")


def _listing(directory: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool, inputs: Sequence[Path], kind: OutputKind) -> Iterator[Path]:
    """A staging directory renamed to `out` only when the block completes (and its files are on disk)."""
    out = Path(out)
    check_not_overlapping(out, inputs, f"--out {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for line in staging.remove_stale(out.parent, out.name):  # may put back an output a killed --force moved aside
        print(line, file=sys.stderr, flush=True)
    check_output(out, force, inputs, kind)
    tmp = staging.make(out.parent, out.name)
    try:
        with interrupt.cleanup_on_interrupt(lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
            sync_tree(tmp)  # durable before it is renamed into place: a crash cannot leave a complete-looking `out`
            with interrupt.deferred():  # the renames are not cut in half by SIGTERM or Ctrl-C
                if out.exists() or out.is_symlink():
                    _replace_dir(tmp, out)
                else:
                    os.rename(tmp, out)
                fsync(out.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` over the existing directory `out`: the old one is moved aside first (a directory
    cannot be renamed over a non-empty one) and put back if `new` cannot take its place (by the next
    run, `staging.remove_stale`, if this process is killed in between)."""
    old = staging.make(out.parent, out.name, staging.REPLACED)
    try:
        os.rename(out, old / out.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old / out.name, out)
        old.rmdir()
        raise
    shutil.rmtree(old)
