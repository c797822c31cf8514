"""A tool run in this process with a signal sent to it at a chosen point (tests/test_reliability_interrupt.py).

    python -m tests.scenarios.interrupted POINT SIGNAL PIDS_FILE TOOL [ARGS ...]

POINT (see POINTS) is where the signal (SIGTERM or SIGKILL) is sent; PIDS_FILE gets this process's PID
and those of the writer or worker processes alive at that moment, one per line, so that the test can
check that none outlives it. SIGUSR1 writes the stack of every thread to stderr, in this process and in
those it forks (the test sends it to a tool that hangs).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import time


def _record(pids_file: str, *pids: int) -> None:
    with open(pids_file, "a") as f:
        f.write("".join(f"{pid}\n" for pid in pids))


def _first(pids_file: str) -> bool:
    """True for the first caller only (across processes)."""
    try:
        os.close(os.open(pids_file + ".sent", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def writers(sig: int, me: int, pids_file: str) -> None:
    """While megatron-core's checkpoint writers write: each writer, once its files are written, records
    itself; the first signals the converter. Writer processes (megatron-core 0.16 forks them; 0.19 writes
    in threads) then wait, as a writer still busy with a large file would."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data

    def write_then_signal(*args, **kwargs):
        result = write(*args, **kwargs)
        _record(pids_file, os.getpid())
        if _first(pids_file):
            os.kill(me, sig)
        if os.getpid() != me:
            time.sleep(120)
        return result

    FileSystemWriterAsync.write_preloaded_data = staticmethod(write_then_signal)


def assets(sig: int, me: int, pids_file: str) -> None:
    """While the tokenizer files are copied into the checkpoint: tokenizer.json half written."""
    from wit_megatron.convert import hf_to_mcore

    def copy_half(hf_dir, dest):
        dest.mkdir(parents=True, exist_ok=True)
        data = (hf_dir / "tokenizer.json").read_bytes()
        (dest / "tokenizer.json").write_bytes(data[: len(data) // 2])
        os.kill(me, sig)

    hf_to_mcore.copy_assets = copy_half


def shards(sig: int, me: int, pids_file: str) -> None:
    """While the exporter streams the safetensors shards: after the first tensor."""
    from wit_megatron.convert.safetensors_io import StreamingSafetensorsWriter

    write = StreamingSafetensorsWriter.write

    def write_then_signal(self, name, tensor):
        write(self, name, tensor)
        os.kill(me, sig)

    StreamingSafetensorsWriter.write = write_then_signal


def replace(sig: int, me: int, pids_file: str) -> None:
    """While --force replaces the output: the old one moved aside, the new one not yet in its place."""
    from wit_megatron import output

    move_aside = output.staging.make

    def make_then_signal(parent, name, kind=output.staging.STAGING):
        made = move_aside(parent, name, kind)
        if kind == output.staging.REPLACED:
            rename = os.rename

            def rename_then_signal(src, dst):
                rename(src, dst)
                os.rename = rename
                os.kill(me, sig)

            os.rename = rename_then_signal
        return made

    output.staging.make = make_then_signal


def parts(sig: int, me: int, pids_file: str) -> None:
    """While preprocessing workers encode: after the first part is merged."""
    from wit_megatron.data.indexed import WITIndexedWriter

    append = WITIndexedWriter.append_part

    def append_then_signal(self, part, max_token_id):
        append(self, part, max_token_id)
        if _first(pids_file):
            _record(pids_file, *(child.pid for child in multiprocessing.active_children()))
            os.kill(me, sig)

    WITIndexedWriter.append_part = append_then_signal


def publish(sig: int, me: int, pids_file: str) -> None:
    """While the finished dataset is moved into place."""
    from wit_megatron.data import preprocess

    move = preprocess.publish

    def signal_then_publish(staged, prefix):
        os.kill(me, sig)
        move(staged, prefix)

    preprocess.publish = signal_then_publish


POINTS = {"writers": writers, "assets": assets, "shards": shards, "replace": replace, "parts": parts, "publish": publish}


def main() -> int:
    from wit_megatron.runtime.kernels import quiet_fallback_warnings

    quiet_fallback_warnings()  # as the tools do, before the points import megatron-core
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    point, signame, pids_file, tool, *argv = sys.argv[1:]
    _record(pids_file, os.getpid())
    POINTS[point](getattr(signal, signame), os.getpid(), pids_file)
    if tool == "wit-preprocess-data":
        from wit_megatron.data.preprocess import main as run
    else:
        from wit_megatron.convert import cli

        run = {"wit-convert-hf-to-megatron": cli.hf_to_megatron, "wit-convert-megatron-to-hf": cli.megatron_to_hf}[tool]
    return run(argv)


if __name__ == "__main__":  # the checkpoint writer starts processes: keep the guard
    sys.exit(main())
