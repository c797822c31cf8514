"""SIGTERM (what `timeout` and Slurm send) and SIGKILL at several points of each writing tool
(docs/reliability.md). After SIGTERM the tool stops its writer or worker processes, removes its
staging, leaves an existing output as it was and exits 143; the last step, moving the complete output
into place, is never cut in half (a signal there comes after it). After SIGKILL its processes die with
it and its staging is left, hidden and never usable as an output; the next run removes it and says so.

Each chain runs the tool in a process of its own with the signal sent at a point (tests/scenarios/
interrupted.py) and checks the exit status, the message, every file and directory afterwards, that
no writer or worker survives, and that the next run succeeds. The three chains run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.reliability import AS_BEFORE, Case, snapshot
from tests.test_reliability_convert import CHECKPOINT, HF
from tests.test_reliability_preprocess import GOOD
from wit_megatron.convert import cli
from wit_megatron.data.preprocess import PreprocessConfig, run
from wit_megatron.runtime.compat import megatron_core_version
from wit_megatron.testing import smollm2

ROOT = Path(__file__).resolve().parents[1]
H2M, M2H, PRE = "wit-convert-hf-to-megatron", "wit-convert-megatron-to-hf", "wit-preprocess-data"
STAGING_LEFT = "as before, plus one hidden staging directory (.OUT.wit-staging-HOST-PID-START-*)"
GONE = "; no writer or worker process outlives the tool"
SCENARIO_TIMEOUT_S = 300  # each takes seconds; a tool still running after this hangs
PREPROCESS_ARGS = ("--input", "{ws}/data.jsonl", "--output-prefix", "{ws}/out", "--tokenizer", "{tok}", "--workers", "2",
                   "--chunk-size", "4", "--no-progress", "--force")

CASES = {
    "h2m_term_writers": Case(H2M, "SIGTERM while megatron-core's checkpoint writers write", ("--hf", "{hf}", "--out", "{ws}/ckpt"),
                             143, "error: interrupted by SIGTERM: nothing of {ws}/ckpt was kept, and what was there before is "
                             "as it was", AS_BEFORE + GONE),
    "h2m_kill_writers": Case(H2M, "SIGKILL while the writers write", ("--hf", "{hf}", "--out", "{ws}/ckpt"), -9, "",
                             STAGING_LEFT + GONE),
    "h2m_kill_assets": Case(H2M, "SIGKILL while tokenizer.json is copied (the next run)", ("--hf", "{hf}", "--out", "{ws}/ckpt"),
                            -9, "removed stale staging {stale} (left by process {stale_pid}, which is no longer running)",
                            STAGING_LEFT + " holding a cut tokenizer.json: every tool refuses it as input"),
    "h2m_next": Case(H2M, "the run after that", ("--hf", "{hf}", "--out", "{ws}/ckpt"), 0,
                     "removed stale staging {stale} (left by process {stale_pid}, which is no longer running)",
                     "as before, plus the complete checkpoint; no staging"),
    "m2h_kill_shards": Case(M2H, "SIGKILL while the safetensors shards are written, --force over an earlier export",
                            ("--megatron", "{ckpt}", "--out", "{ws}/hf", "--force"), -9, "",
                            STAGING_LEFT + ": refused as an HF model; the earlier export as it was"),
    "m2h_kill_replace": Case(M2H, "SIGKILL between moving the earlier export aside and renaming the new one in (the next run)",
                             ("--megatron", "{ckpt}", "--out", "{ws}/hf", "--force"), -9,
                             "removed stale staging {stale} (left by process {stale_pid}, which is no longer running)",
                             "HF gone; the earlier export in .HF.wit-replaced-*, the new one in .HF.wit-staging-*"),
    "m2h_term_replace": Case(M2H, "SIGTERM at the same point (the next run)", ("--megatron", "{ckpt}", "--out", "{ws}/hf",
                                                                               "--force"), 143,
                             "restored {ws}/hf from {replaced} (left by process {stale_pid}, which is no longer running: it was "
                             "interrupted while replacing {ws}/hf) ... error: interrupted by SIGTERM after {ws}/hf was complete "
                             "and in place", "the new export in place (equal to the earlier one); no staging"),
    "pre_term_parts": Case(PRE, "SIGTERM while 2 workers encode, --force over an earlier dataset", PREPROCESS_ARGS, 143,
                           "error: interrupted by SIGTERM: nothing of the dataset {ws}/out was kept, and what was there before is "
                           "as it was", AS_BEFORE + GONE),
    "pre_kill_parts": Case(PRE, "SIGKILL while the workers encode", PREPROCESS_ARGS, -9, "", STAGING_LEFT + GONE),
    "pre_term_publish": Case(PRE, "SIGTERM while the dataset is moved into place (the next run)", PREPROCESS_ARGS, 143,
                             "removed stale staging {stale} (left by process {stale_pid}, which is no longer running) ... error: "
                             "interrupted by SIGTERM after the dataset {ws}/out was complete and in place",
                             "the new dataset in place; no staging"),
}


def interrupted(point: str, signame: str, case: Case, paths: dict, tmp: Path) -> tuple[int, str, list[int]]:
    """(exit status, stderr, PIDs of the tool and of its writers/workers) of `case` signalled at `point`."""
    argv = [arg.format(**{key: str(value) for key, value in paths.items()}) for arg in case.argv]
    pids_file = tmp / f"pids-{point}-{signame}-{time.monotonic_ns()}"
    with subprocess.Popen([sys.executable, "-m", "tests.scenarios.interrupted", point, signame, str(pids_file), case.tool, *argv],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as tool:
        try:
            _, stderr = tool.communicate(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung(tool)
    pids = [int(line) for line in pids_file.read_text().split()]
    return tool.returncode, " ".join(stderr.split()), pids


def hung(tool: subprocess.Popen) -> None:
    """Fail with the stacks of every thread of the tool and of its children (faulthandler, on SIGUSR1)."""
    processes = [psutil.Process(tool.pid), *psutil.Process(tool.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGUSR1)
    time.sleep(2)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _, stderr = tool.communicate()
    raise AssertionError(f"{' '.join(tool.args[2:])}\nstill running after {SCENARIO_TIMEOUT_S} s; the stacks of it and "
                         f"its children:\n{stderr[-12000:]}")


def none_survives(pids: list[int]) -> None:
    """No writer or worker of the tool (pids[0]) is alive a few seconds after it ended."""
    others = [pid for pid in pids[1:] if pid != pids[0]]
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) for pid in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in others if psutil.pid_exists(pid)], others


def hidden(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("."))


def stale(entry: Path) -> dict:
    """Placeholders naming a staging directory a killed run left, and its owner."""
    from wit_megatron import staging

    return {"stale": entry, "stale_pid": staging.owner(entry).pid}


def says(case: Case, paths: dict, err: str) -> None:
    for fragment in case.bind(paths)[1].split(" ... "):
        assert fragment in err, (case.what, fragment, err[-3000:])


def hf_to_megatron_chain(tmp: Path) -> None:
    ws = tmp / "h2m"
    shutil.copytree(HF, ws / "hf")
    shutil.copy(smollm2.tokenizer_dir() / "tokenizer.json", ws / "hf")
    paths, before = {"ws": ws, "hf": ws / "hf"}, snapshot(ws)

    status, err, pids = interrupted("writers", "SIGTERM", CASES["h2m_term_writers"], paths, tmp)
    assert status == 143 and "Traceback" not in err, err[-3000:]
    says(CASES["h2m_term_writers"], paths, err)
    assert snapshot(ws) == before
    none_survives(pids)
    if megatron_core_version() < (0, 17):
        assert len(set(pids)) > 1  # 0.16 writes in forked processes (0.19: in threads of the converter)

    status, err, pids = interrupted("writers", "SIGKILL", CASES["h2m_kill_writers"], paths, tmp)
    assert status == -9
    none_survives(pids)
    (left,) = hidden(ws)
    assert left.name.startswith(".ckpt.wit-staging-") and {k for k in snapshot(ws) if not k.startswith(".")} == set(before)

    status, err, pids = interrupted("assets", "SIGKILL", CASES["h2m_kill_assets"], paths, tmp)
    assert status == -9
    says(CASES["h2m_kill_assets"], dict(paths, **stale(left)), err)
    (left,) = hidden(ws)  # the first one removed, this run's left
    cut = left / "hf_assets/tokenizer.json"
    assert cut.stat().st_size == (ws / "hf/tokenizer.json").stat().st_size // 2
    for refused in (cli.megatron_to_hf(["--megatron", str(left), "--out", str(tmp / "x"), "--dry-run"]),
                    cli.megatron_to_hf(["--megatron", str(left / "release"), "--out", str(tmp / "x"), "--dry-run"])):
        assert refused == 2

    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(ws / "hf"), "--out",
                           str(ws / "ckpt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    says(CASES["h2m_next"], dict(paths, **stale(left)), " ".join(done.stderr.split()))
    assert not re.search("(is|are) not installed", done.stderr), done.stderr[-3000:]  # megatron-core's TE/Apex warnings
    assert hidden(ws) == [] and (ws / "ckpt/latest_checkpointed_iteration.txt").read_text() == "release"
    assert (ws / "ckpt/hf_assets/tokenizer.json").read_bytes() == (ws / "hf/tokenizer.json").read_bytes()


def megatron_to_hf_chain(tmp: Path) -> None:
    ws = tmp / "m2h"
    shutil.copytree(CHECKPOINT, ws / "ckpt")
    shutil.copy(smollm2.tokenizer_dir() / "tokenizer.json", ws / "ckpt/hf_assets")
    assert cli.megatron_to_hf(["--megatron", str(ws / "ckpt"), "--out", str(ws / "hf")]) == 0  # the earlier export
    paths, before = {"ws": ws, "ckpt": ws / "ckpt"}, snapshot(ws)

    status, err, _ = interrupted("shards", "SIGKILL", CASES["m2h_kill_shards"], paths, tmp)
    assert status == -9
    (left,) = hidden(ws)
    assert left.name.startswith(".hf.wit-staging-") and (left / "model.safetensors").exists()
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith(".")} == before
    assert cli.hf_to_megatron(["--hf", str(left), "--out", str(tmp / "x"), "--dry-run"]) == 2

    status, err, _ = interrupted("replace", "SIGKILL", CASES["m2h_kill_replace"], paths, tmp)
    assert status == -9
    says(CASES["m2h_kill_replace"], dict(paths, **stale(left)), err)
    assert not (ws / "hf").exists()
    replaced, new = hidden(ws)
    assert replaced.name.startswith(".hf.wit-replaced-") and new.name.startswith(".hf.wit-staging-")
    assert {k.removeprefix(f"{replaced.name}/"): v for k, v in snapshot(ws).items() if k.startswith(f"{replaced.name}/")} == \
        {k: v for k, v in before.items() if k.startswith("hf/") or k == "hf"}

    status, err, _ = interrupted("replace", "SIGTERM", CASES["m2h_term_replace"], paths, tmp)
    assert status == 143 and "Traceback" not in err, err[-3000:]
    says(CASES["m2h_term_replace"], dict(paths, replaced=replaced, **stale(replaced)), err)
    assert f"removed stale staging {new}" in err
    assert snapshot(ws) == before  # the same checkpoint exported again: the same bytes, in place


def preprocess_chain(tmp: Path) -> None:
    ws = tmp / "pre"
    ws.mkdir()
    (ws / "data.jsonl").write_text("".join(json.dumps(dict(GOOD, prompt=f"Add 2 and {i}.")) + "\n" for i in range(40)))
    run(PreprocessConfig([str(ws / "data.jsonl")], str(ws / "out"), str(smollm2.tokenizer_dir()), progress=False))
    old = json.loads((ws / "out.meta.json").read_text())["dataset_uuid"]
    paths, before = {"ws": ws, "tok": smollm2.tokenizer_dir()}, snapshot(ws)

    status, err, pids = interrupted("parts", "SIGTERM", CASES["pre_term_parts"], paths, tmp)
    assert status == 143 and "Traceback" not in err, err[-3000:]
    says(CASES["pre_term_parts"], paths, err)
    assert snapshot(ws) == before and len(pids) == 3  # the tool and its 2 workers
    none_survives(pids)

    status, err, pids = interrupted("parts", "SIGKILL", CASES["pre_kill_parts"], paths, tmp)
    assert status == -9 and len(pids) == 3
    none_survives(pids)
    (left,) = hidden(ws)
    assert left.name.startswith(".out.wit-staging-")
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith(".")} == before

    status, err, _ = interrupted("publish", "SIGTERM", CASES["pre_term_publish"], paths, tmp)
    assert status == 143, err[-3000:]
    says(CASES["pre_term_publish"], dict(paths, **stale(left)), err)
    assert hidden(ws) == []
    meta = json.loads((ws / "out.meta.json").read_text())
    assert meta["records"] == 40 and meta["dataset_uuid"] != old


def test_interrupted_tools_leave_nothing_that_looks_complete_and_the_next_run_cleans_up(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        for chain in [pool.submit(f, tmp_path) for f in (hf_to_megatron_chain, megatron_to_hf_chain, preprocess_chain)]:
            chain.result()


@pytest.mark.parametrize("kind", ["staging", "replaced"])
def test_staging_of_running_or_other_hosts_processes_is_kept(tmp_path, kind):
    """remove_stale removes only what a process of this host that no longer runs left: a live owner's
    staging (this process's) and another host's are kept."""
    from wit_megatron import staging

    mine = staging.make(tmp_path, "out", kind=getattr(staging, kind.upper()))
    other_host = tmp_path / f".out.wit-{kind}-00000000-1-1-abc"
    other_host.mkdir()
    assert staging.remove_stale(tmp_path, "out") == []
    assert sorted(hidden(tmp_path)) == sorted([mine, other_host])
    assert os.getpid() == staging.owner(mine).pid and staging.owner(mine).running()


def test_children_forked_by_a_tool_end_on_sigterm_whatever_they_are_blocked_in():
    """A pool worker blocked on its queue's lock when the signal reaches another of its threads (or lands
    just before it blocks) used to live on, and Pool.terminate() waited for it forever; the child ends by
    SIGTERM's default action instead. A child forked after the tool's block keeps the process's handler."""
    done = subprocess.run([sys.executable, "-m", "tests.scenarios.child_signals"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == [str(-signal.SIGTERM), "the_process_own"], done.stdout
