"""The tools take SIGTERM as they take Ctrl-C, and their child processes do not outlive them.

Schedulers (Slurm) and `timeout` stop a job with SIGTERM. Inside `stop_on_signals` (the tools' entry
points) SIGTERM and SIGINT end the tool the same way: its child processes (megatron-core's checkpoint
writers, preprocessing workers) are stopped first, so none keeps writing; then the clean-ups that the
writing code registered (`cleanup_on_interrupt`: remove the staging) run, the children are killed,
and the tool says what became of its output and exits with 128 + the signal's number. This is done in the signal handler itself rather
than by an exception unwinding the stack: a signal can arrive anywhere, also where Python swallows
exceptions (in at-fork callbacks while megatron-core forks its writers, in finalizers), and a pool of
killed workers can hang the pool's own shut-down. The children themselves, forked inside the block,
take SIGTERM and SIGINT by the kernel's default action: they end at once, whatever they are blocked in.

The last step of a write, moving the complete output into place, runs with the signals `deferred`: an
output is never left half replaced, and a signal that arrived during it ends the tool right after it,
saying that the output is complete. A parent killed outright (SIGKILL) cannot clean up: its children
get SIGKILL from the kernel (`die_with_parent`, Linux), and the next run of the tool removes the staging
it left (wit_megatron.staging). Library code only registers clean-ups; entry points install the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Run:
    """What the handler needs: the output being written, its clean-ups, whether it is complete."""

    output: Optional[str] = None
    cleanups: list[Callable[[], None]] = []
    complete = False
    deferring = False  # inside `deferred`: a signal waits in `pending`
    pending: Optional[int] = None
    pid: Optional[int] = None  # the process whose tool this is (forked children inherit the handler)


_parent_pid: Optional[int] = None
_registered = False
_children_default_registered = False


@contextlib.contextmanager
def stop_on_signals(output: Optional[str] = None) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT stop the children, run the clean-ups, print what became of
    `output` (a description, e.g. a path) and exit with 128 + the signal's number."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _children_default_registered
    if not _children_default_registered:
        os.register_at_fork(after_in_child=_default_signals_in_child)
        _children_default_registered = True
    _Run.output, _Run.cleanups, _Run.complete, _Run.pending, _Run.pid = output, [], False, None, os.getpid()
    previous = {signum: signal.signal(signum, _stop) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _Run.output, _Run.cleanups, _Run.pid = None, [], None


def _default_signals_in_child() -> None:
    """In a process forked inside `stop_on_signals` (a pool worker, a checkpoint writer): SIGTERM and SIGINT
    take the kernel's default action, ending it at once. With the tool's handler inherited, a child acts on
    a signal only when its main thread next runs Python code; one that lands just before that thread blocks
    in C (a pool worker taking its queue's lock) or on another of its threads is never acted on, and
    Pool.terminate() then waits for that worker forever."""
    if _Run.pid is not None:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


@contextlib.contextmanager
def cleanup_on_interrupt(action: Callable[[], None]) -> Iterator[None]:
    """Run `action` if the tool is stopped by a signal while the block runs (a no-op outside `stop_on_signals`)."""
    _Run.cleanups.append(action)
    try:
        yield
    finally:
        if action in _Run.cleanups:
            _Run.cleanups.remove(action)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done, and are handled right after it; when the block
    completed, the output counts as complete. (Python runs signal handlers in the main thread whichever
    thread the signal reached, so the handler itself waits: masking the signal would not do.)"""
    _Run.deferring = True
    try:
        yield
        _Run.complete = True
    finally:
        _Run.deferring = False
        if _Run.pending is not None:
            _stop(_Run.pending, None)


def message(signum: int) -> str:
    """What a tool stopped by `signum` tells the user (after 'error: ')."""
    said = f"interrupted by {signal.Signals(signum).name}"
    if _Run.output is None:
        return said
    if _Run.complete:
        return f"{said} after {_Run.output} was complete and in place"
    return f"{said}: nothing of {_Run.output} was kept, and what was there before is as it was"


def _stop(signum, frame) -> None:
    if os.getpid() != _Run.pid:
        # A signal that reached a forked child before `_default_signals_in_child` ran (during another
        # at-fork callback): the child ends without running the tool's clean-ups (they remove the tool's
        # staging) or speaking for it.
        os._exit(128 + signum)
    if _Run.deferring:
        _Run.pending = signum
        return
    for other in SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    # Frozen first, killed after the clean-up: a frozen child writes nothing more, and a process pool
    # does not start a replacement for it (a killed worker's replacement would write into the staging).
    for child in multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGSTOP)
    _clean_up(signum)
    stop_children()
    _clean_up(signum)  # again: what a thread of this process wrote meanwhile
    _say(f"error: {message(signum)}")
    os._exit(128 + signum)


def _clean_up(signum: int) -> None:
    for action in reversed(_Run.cleanups):
        try:
            action()
        except Exception as e:  # the others still run; what is left is removed by the next run
            _say(f"warning: clean-up after {signal.Signals(signum).name} failed: {e}")


def _say(line: str) -> None:
    """To stderr's file descriptor: the handler may have interrupted a write to sys.stderr (a progress bar)."""
    os.write(2, (line + "\n").encode())


def stop_children() -> None:
    """Kill and reap this process's multiprocessing children (writers, workers; stopped ones too)."""
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(10)


def die_with_parent() -> None:
    """Every process forked from now on gets SIGKILL when this one dies (Linux; elsewhere nothing)."""
    global _registered
    if _registered or _prctl() is None:
        return
    os.register_at_fork(before=_remember_parent, after_in_child=lambda: parent_death_signal(_parent_pid))
    _registered = True


def _remember_parent() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


@functools.lru_cache(maxsize=None)
def _prctl():
    """libc's prctl, looked up here in the parent: a forked child of a process with threads must not
    dlopen (the loader's lock may have been held by another thread at the fork)."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def child_dies_with_this_process() -> Callable[[], None]:
    """A subprocess `preexec_fn`: the child gets SIGKILL when this process dies (Linux)."""
    _prctl()  # looked up now, in the parent
    return functools.partial(parent_death_signal, os.getpid())


def parent_death_signal(parent_pid: int) -> None:
    """In a child of `parent_pid`: SIGKILL when the parent dies (Linux)."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was set
        os._exit(1)
