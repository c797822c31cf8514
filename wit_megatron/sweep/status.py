"""What one run of a sweep did, read from its train.log: status, progress, its last losses.

run.sh appends each start of the run to train.log between two lines of its own,

    === attempt started 2026-12-03T10:00:00Z on node7, Slurm job 123_4: --load /ckpt/base
    ... the training output (Megatron-LM's log lines, printed by the last rank) ...
    === attempt ended 2026-12-03T11:00:00Z: exit status 0

so the log holds the whole history of a run that was stopped and resumed. Status:

    not started   no train.log
    running       the last attempt has not ended (or was killed without a word: the detail says
                  how long ago it last wrote, and where it ran)
    finished      exit status 0 after the last iteration
    stopped       a clean stop before the end (SIGTERM or a time limit: exit status 143;
                  --exit-interval / --exit-duration-in-mins: 0); starting run.sh again resumes it
    failed        any other ending; the detail is the error that ended it: the first exception (or
                  `error:` line) of the last attempt, since when one rank fails the others' errors
                  that follow are consequences; torchrun's own summary is not an error line

A resumed attempt repeats the iterations after the save it resumed from: its log lines replace the
earlier attempt's from there on, so iterations, tokens and losses are those of the run's one history.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from wit_megatron.sweep.plan import CHECKPOINTS, LOG

ATTEMPT_STARTED = "=== attempt started "
ATTEMPT_ENDED = re.compile(r"^=== attempt ended .*: exit status (-?\d+)$")
TRAIN_LINE = re.compile(r"^ iteration\s+(\d+)/\s*(\d+) \|(.*)$")
VALID_LINE = re.compile(r"^ validation loss at iteration (\d+) \|(.*)$")
RESUMED = re.compile(r"^loaded .*: resuming after iteration (\d+), (\d+) samples consumed$")
STOPPED = re.compile(r"^stopping after iteration (\d+): (\S+)$")
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")  # torch's per-rank prefix of worker output
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Failure)(?::\s.*)?$")
ERROR_MESSAGE = re.compile(r"^(?:\S+: )?error: .+$")  # argparse's ("pretrain_wit.py: error: ...") and the entry point's
TORCHRUN_WRAPPER = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
KILLED = re.compile(r"(Signal \d+ \(SIG\w+\) received by PID \d+|exitcode\s*:\s*-?\d+.*)")
STOP_EXIT_STATUS = 143  # the entry point after SIGTERM


def fields(text: str) -> dict:
    """'| key: value | key: value |' -> {key: float or int}."""
    values = {}
    for part in text.split("|"):
        key, sep, value = part.partition(":")
        if not sep:
            continue
        value = value.strip()
        try:
            values[key.strip()] = int(value) if re.fullmatch(r"-?\d+", value) else float(value)
        except ValueError:
            pass
    return values


@dataclass
class Attempt:
    header: str  # "2026-... on HOST: --load ..." (empty for output before any attempt line)
    exit_status: Optional[int] = None  # None: not ended
    resumed_from: Optional[int] = None
    stop: Optional[tuple[int, str]] = None  # (iteration, reason)
    lines: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.exit_status is not None

    def error(self) -> Optional[str]:
        """The error that ended this attempt (see the module docstring), else what killed it, else its last line."""
        lines = [RANK_PREFIX.sub("", line).rstrip() for line in self.lines]
        for line in lines:
            if (EXCEPTION.match(line) and not line.startswith(TORCHRUN_WRAPPER)) or ERROR_MESSAGE.match(line):
                return line
        killed = [m.group(1) for line in lines if (m := KILLED.search(line))]
        if killed:
            return killed[0].strip()
        last = [line for line in lines if line.strip()]
        return last[-1].strip() if last else None


@dataclass
class RunLog:
    """The run's history: its attempts and the log lines that stand (a resume replaces what followed its save)."""

    attempts: list[Attempt]
    train: list[dict]  # one per training log line: the line's values, "iteration", "train_iters", "first" (interval start)
    valid: list[dict]  # one per validation: values, "iteration"

    @property
    def tokens_seen(self) -> Optional[int]:
        """Targets trained on (prompt + response tokens of every log interval), if the kept intervals
        cover every iteration (a resume from a save between two log lines leaves a gap), else None."""
        covered = 0
        for line in self.train:
            if line["first"] != covered:
                return None
            covered = line["iteration"]
        return sum(line.get("prompt tokens", 0) + line.get("response tokens", 0) for line in self.train)


def read_log(path: Path) -> RunLog:
    attempts: list[Attempt] = []
    train: list[dict] = []
    valid: list[dict] = []
    attempt = None
    previous = 0  # the last iteration logged in this attempt
    seen_train = False
    for raw in Path(path).read_text(errors="replace").splitlines():
        line = RANK_PREFIX.sub("", raw)
        if raw.startswith(ATTEMPT_STARTED) or attempt is None:
            attempt = Attempt(raw[len(ATTEMPT_STARTED):] if raw.startswith(ATTEMPT_STARTED) else "")
            attempts.append(attempt)
            previous, seen_train = 0, False
            if raw.startswith(ATTEMPT_STARTED):
                continue
        if (m := ATTEMPT_ENDED.match(raw)):
            attempt.exit_status = int(m.group(1))
            continue
        attempt.lines.append(raw)
        if (m := RESUMED.match(line)):
            attempt.resumed_from = previous = int(m.group(1))
        elif (m := STOPPED.match(line)):
            attempt.stop = (int(m.group(1)), m.group(2))
        elif (m := TRAIN_LINE.match(line)):
            iteration = int(m.group(1))
            if not seen_train:  # this attempt's history replaces what followed the iteration it started from
                start = attempt.resumed_from or 0
                train = [t for t in train if t["iteration"] <= start]
                valid = [v for v in valid if v["iteration"] <= start]
                seen_train = True
            train.append(dict(fields(m.group(3)), iteration=iteration, train_iters=int(m.group(2)), first=previous))
            previous = iteration
        elif (m := VALID_LINE.match(line)):
            valid.append(dict(fields(m.group(2)), iteration=int(m.group(1))))
    return RunLog(attempts, train, valid)


@dataclass
class RunState:
    status: str  # not started, running, finished, stopped, failed
    detail: str = ""
    log: Optional[RunLog] = None
    saved_iteration: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


def run_state(run_dir: Path, now: Optional[float] = None) -> RunState:
    run_dir = Path(run_dir)
    tracker = run_dir / CHECKPOINTS / "latest_checkpointed_iteration.txt"
    saved = int(tracker.read_text().strip()) if tracker.is_file() and tracker.read_text().strip().isdigit() else None
    log_path = run_dir / LOG
    if not log_path.is_file():
        return RunState("not started", saved_iteration=saved)
    log = read_log(log_path)
    last = log.attempts[-1] if log.attempts else None
    state = RunState("running", log=log, saved_iteration=saved)
    progress = f"iteration {log.train[-1]['iteration']} of {log.train[-1]['train_iters']}" if log.train else "no iteration yet"
    if last is None or not last.ended:
        age = (now if now is not None else time.time()) - log_path.stat().st_mtime
        where = f" on {last.header}" if last is not None and last.header else ""
        state.detail = f"{progress}; no exit recorded, last output {_duration(age)} ago (attempt started{where})"
    elif last.exit_status == 0 and last.stop is None and log.train and log.train[-1]["iteration"] == log.train[-1]["train_iters"]:
        state.status = "finished"
    elif last.stop is not None and last.exit_status in (0, STOP_EXIT_STATUS):
        state.status = "stopped"
        state.detail = (f"after iteration {last.stop[0]} of {log.train[-1]['train_iters'] if log.train else '?'} "
                        f"({last.stop[1]}, exit status {last.exit_status}); run.sh resumes it"
                        + (f" from iteration {saved}" if saved is not None else " from the start (no save)"))
    else:
        state.status = "failed"
        state.detail = f"exit status {last.exit_status}: {last.error() or 'no output'}"
    return state


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
