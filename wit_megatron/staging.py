"""Hidden staging directories that name their owner, so that what an interrupted run leaves is found and removed.

Every tool writes its output into a hidden sibling directory and moves it into place only when it is
complete. The directory's name says whose it is:

    .OUT.wit-staging-HOST-PID-START-XXXXXXXX    a write in progress
    .OUT.wit-replaced-HOST-PID-START-XXXXXXXX   the previous OUT, moved aside by --force until its
                                                replacement is in place

(HOST: a hash of the host name, PID and START: the owning process and its start time, which tell it
from a later process with the same PID.) A run killed outright (SIGKILL, a node failure) cannot
clean up; the next run of a tool for the same OUT removes what a process of this host that is no
longer running left (`remove_stale`) and says so. Staging of other hosts (a shared file system)
is left alone: whether their owner still runs cannot be told from here.

A staging path is never a usable output: readers refuse any path inside one (`refuse_staging`),
and the files that mark an output complete (a checkpoint's tracker file, a dataset's meta.json, an
HF export's config.json) are written last.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

STAGING = "wit-staging"
REPLACED = "wit-replaced"
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>wit-staging|wit-replaced)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[^-]+$")
# A training save's iteration directory in progress, and the one it replaces (checkpoint.save).
_TRAINING_SAVE = re.compile(r"^\.iter_\d+\.(saving|replaced)$")


class StagingError(ValueError):
    """A path inside a staging directory given as if it were a complete output."""


@dataclass(frozen=True)
class Owner:
    name: str  # the output's name (OUT)
    kind: str  # STAGING or REPLACED
    host: str
    pid: int
    start: int

    def running(self) -> bool:
        """Whether the owning process may still run: other hosts' owners and processes that cannot be
        inspected count as running; a process of this PID started at another time is another process."""
        if self.host != _host():
            return True
        try:
            started = _start_time(self.pid)
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True
        return abs(started - self.start) <= 2  # the start time read back may differ by a rounding step


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int:
    return int(psutil.Process(pid).create_time())


def make(parent: Path, name: str, kind: str = STAGING) -> Path:
    """A new empty staging directory for output `name` in `parent`, owned by this process."""
    pid = os.getpid()
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_host()}-{pid}-{_start_time(pid)}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    return path


def owner(path: Path) -> Optional[Owner]:
    """The owner a staging directory's name records, or None for any other path."""
    found = _OWNED.match(Path(path).name)
    if found is None:
        return None
    return Owner(found["name"], found["kind"], found["host"], int(found["pid"]), int(found["start"]))


def refuse_staging(path: Path, what: str) -> None:
    """Raise StagingError if `path` is, or lies inside, a staging directory."""
    for part in Path(os.path.abspath(path)).parts:
        if _OWNED.match(part) or _TRAINING_SAVE.match(part):
            raise StagingError(f"{path}: not a complete {what}: {part} is the hidden staging directory of a write that has "
                               "not finished (or was interrupted), never an output; use the output it was being written for")


def remove_stale(parent: Path, name: str) -> list[str]:
    """Remove the staging for output `name` in `parent` that processes of this host which no longer run
    left behind; an output that --force had moved aside and whose replacement never took its place is
    put back. Returns one line per action, for the user."""
    done = []
    parent = Path(parent)
    if not parent.is_dir():
        return done
    for path in sorted(parent.iterdir()):
        found = owner(path)
        if found is None or found.name != name or found.running():
            continue
        what = f"left by process {found.pid}, which is no longer running"
        out = parent / name
        if found.kind == REPLACED and not out.exists() and (path / name).exists():
            os.rename(path / name, out)
            path.rmdir()
            done.append(f"restored {out} from {path} ({what}: it was interrupted while replacing {out})")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed stale staging {path} ({what})")
    return done
