"""An output directory that appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from wit_megatron.checkpoint import fsync, sync_tree
from wit_megatron.convert.transforms import ConversionError


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory renamed to `out` only when the block completes (and its files are
    on disk).

    An existing `out` is refused unless `force`; then it is replaced only after the new one is complete."""
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"output directory {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        sync_tree(tmp)  # durable before it is renamed into place: a crash cannot leave a complete-looking `out`
        if out.exists():
            _replace_dir(tmp, out)
        else:
            os.rename(tmp, out)
        fsync(out.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` over the existing directory `out`: the old one is moved aside first (a directory
    cannot be renamed over a non-empty one) and put back if `new` cannot take its place."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
