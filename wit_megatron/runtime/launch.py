"""Run a function on N local ranks and bring its results (or its failures) back to the caller.

Used by tests, benchmarks and tools/verify_conversion.py on one machine (gloo on CPU).

The function runs in a fresh interpreter that imports torch and megatron-core once and then forks
the ranks, so N ranks cost one import (the import dominates start-up on a 2-core machine).
Ranks run with one intra-op thread each. Results travel through `torch.save` files.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from wit_megatron import interrupt


class DistributedFailure(AssertionError):
    """A rank raised, crashed or timed out; the message holds every failing rank's traceback."""


def run_distributed(target: str, world_size: int, timeout_s: float = 900, **kwargs: Any) -> list[Any]:
    """Call `target` ("package.module:function") as `function(**kwargs)` on `world_size` ranks.

    Returns the per-rank return values, indexed by global rank.
    """
    with tempfile.TemporaryDirectory(prefix="wit-dist-") as tmp:
        workdir = Path(tmp)
        torch.save(kwargs, workdir / "kwargs.pt")
        cmd = [sys.executable, "-m", "wit_megatron.runtime.launch", target, str(world_size), tmp]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Its own process group, so that a timeout (or Ctrl-C here) kills the forked ranks too, not only the launcher.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=interrupt.child_dies_with_this_process())
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise DistributedFailure(f"{target} on {world_size} ranks timed out after {timeout_s}s\n{out}\n{err}")
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        errors = sorted(workdir.glob("rank*.err"))
        if proc.returncode != 0 or errors:
            tracebacks = {p.stem: p.read_text() for p in errors}
            # The causes first, on the message's first line: a test report that keeps one line (pytest -ra)
            # or cuts the middle of a long one still says what went wrong.
            causes = "; ".join(f"{rank}: {' <- '.join(exception_lines(text))}" for rank, text in tracebacks.items())
            detail = "\n".join(f"--- {rank}\n{text}" for rank, text in tracebacks.items())
            raise DistributedFailure(
                f"{target} on {world_size} ranks failed (exit {proc.returncode}){': ' + causes if causes else ''}\n"
                f"{detail}\n--- output (tail)\n{(out + err)[-6000:]}"
            )
        return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def exception_lines(traceback_text: str) -> list[str]:
    """The exceptions of a formatted traceback, one line each (a multi-line message joined with " / "),
    the last raised first, then the exceptions it was raised from or while handling."""
    chain_notes = ("The above exception was the direct cause", "During handling of the above exception")
    exceptions, message = [], []
    for line in traceback_text.splitlines() + ["Traceback (most recent call last):"]:
        if line.startswith("Traceback (most recent call last):"):
            if message:
                exceptions.append(" / ".join(message))
            message = []
        elif line.startswith(" "):  # a frame or its source line: what came before was not the message
            message = []
        elif line and not line.startswith(chain_notes):
            message.append(line)
    return exceptions[::-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, workdir: Path, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        from wit_megatron.runtime.parallel import init_distributed

        init_distributed()
        result = fn(**kwargs)
        torch.save(result, workdir / f"rank{rank}.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        (workdir / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _main(target: str, world_size: int, workdir: Path) -> int:
    import multiprocessing

    torch.set_num_threads(1)
    from wit_megatron.runtime import cpu
    from wit_megatron.runtime.kernels import quiet_fallback_warnings

    quiet_fallback_warnings()
    interrupt.die_with_parent()  # no rank outlives the launcher
    cpu.enable()
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    kwargs = torch.load(workdir / "kwargs.pt", weights_only=False)
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, workdir, kwargs))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    # A rank that fails leaves its peers blocked in a collective: stop them all.
    stopped = set()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2)  # let the failing rank's peers write their own errors if they can
            for r, p in enumerate(procs):
                if p.is_alive():
                    p.kill()
                    stopped.add(r)
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    for r in failed:
        err = workdir / f"rank{r}.err"
        if r in stopped:
            err.write_text(f"rank {r} was stopped after another rank failed\n")
        elif not err.exists():
            err.write_text(f"rank {r} exited with code {procs[r].exitcode} without a Python traceback\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
