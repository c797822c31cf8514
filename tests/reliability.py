"""The fault and bad-input cases of docs/reliability.md: declared here by the test modules that run them
(tests/test_reliability_*.py), and rendered into the document from the same tables.

    python -m tests.reliability > docs/reliability.md    # tests/test_reliability_doc.py fails while it is stale

A case names the tool, what is wrong, the command line, the exit status, what the message says (a
fragment of stderr) and what the file system holds afterwards. Paths are placeholders ({hf}, {ckpt},
...) that each test binds to files in its own directory and the document prints in capitals.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import re
import signal
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

AS_BEFORE = "exactly as before"

MODULES = ("tests.test_reliability_convert", "tests.test_reliability_preprocess", "tests.test_reliability_training",
           "tests.test_reliability_interrupt")


@dataclass(frozen=True)
class Case:
    tool: str  # the command, as users type it
    what: str  # what is wrong, in the user's words
    argv: tuple[str, ...]  # its arguments, with {placeholders}
    exit: int  # the exit status (a negative number: killed by that signal)
    says: str  # a fragment of what it prints to stderr, with {placeholders}
    after: str = AS_BEFORE  # what the file system holds afterwards

    def bind(self, paths: dict[str, Path]) -> tuple[list[str], str]:
        """(argv, says) with the placeholders replaced by `paths`."""
        names = {key: str(value) for key, value in paths.items()}
        return [arg.format(**names) for arg in self.argv], self.says.format(**names)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` (hidden ones too): relative path -> content digest ('dir' for
    directories): two snapshots are equal only if nothing was added, removed or changed."""
    result = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            result[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return result


def run_in_process(main: Callable[[list[str]], Optional[int]], argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of a tool's main function called here (argparse's errors exit through SystemExit)."""
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            status = main(argv) or 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return status, err.getvalue()


def check(case: Case, paths: dict[str, Path], root: Path, main: Callable, before: Optional[dict] = None) -> str:
    """Run `case` in process and assert its exit status and message, and (AS_BEFORE) that `root` holds
    exactly what it held before. Returns stderr."""
    argv, says = case.bind(paths)
    before = snapshot(root) if before is None else before
    status, err = run_in_process(main, argv)
    assert status == case.exit, (case.what, status, err[-3000:])
    assert says in " ".join(err.split()), (case.what, says, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if case.after == AS_BEFORE:
        assert snapshot(root) == before, case.what
    return err


def all_cases() -> list[Case]:
    return [case for name in MODULES for case in importlib.import_module(name).CASES.values()]


def _placeholder(text: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), text)


def _exit(status: int) -> str:
    return f"killed ({signal.Signals(-status).name})" if status < 0 else str(status)


def render() -> str:
    lines = [
        "# Reliability: bad input, interruption and untrusted checkpoints",
        "",
        "Generated from the test tables by `python -m tests.reliability > docs/reliability.md`; every row is a test",
        "(tests/test_reliability_*.py) that runs the command and asserts its exit status, that stderr contains the",
        "message shown (paths in capitals stand for the test's files), and what the file system holds afterwards:",
        f"\"{AS_BEFORE}\" means every file and directory under the test's directory, hidden ones included, is",
        "unchanged, with nothing added.",
        "",
        "The rules behind them: [docs/convert.md](convert.md) (output directories, `--force`, untrusted",
        "checkpoints), [docs/data.md](data.md) (the output prefix, zero records, the data checked against the",
        "checkpoint when training starts).",
        "",
    ]
    tools = list(dict.fromkeys(case.tool for case in all_cases()))
    for tool in tools:
        lines += [f"## {tool}", "", "| case | command | exit | says | file system after |", "|---|---|---|---|---|"]
        for case in all_cases():
            if case.tool == tool:
                command = " ".join([tool.split()[0], *case.argv])
                cells = [case.what, f"`{_placeholder(command)}`", _exit(case.exit), _placeholder(case.says) or "—", case.after]
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
