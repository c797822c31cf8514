"""Real artifacts built once from what PyPI packages ship, cached under $WIT_CACHE_DIR (default
~/.cache/wit-megatron). Each is built in a temporary sibling directory and renamed into place when
complete, so concurrent builders (parallel tests, ranks) never see half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("WIT_CACHE_DIR", Path.home() / ".cache" / "wit-megatron"))


def built_once(name: str, marker: str, build: Callable[[Path], None]) -> Path:
    """cache_root()/name, made by `build(directory)` unless it already holds `marker` (a file the
    build writes)."""
    target = cache_root() / name
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / marker).is_file():  # not merely another builder winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
