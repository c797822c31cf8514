"""The launcher's failure report: what a rank raised is on the report's first line."""

from __future__ import annotations

import pytest

from wit_megatron.runtime.launch import DistributedFailure, exception_lines, run_distributed


def test_a_failed_rank_reports_its_exceptions_on_the_first_line(tmp_path):
    missing = tmp_path / "no-such-dir" / "file"
    with pytest.raises(DistributedFailure) as failure:
        run_distributed("tests.scenarios.launch:fails_with_a_cause", 1, path=str(missing))
    first_line = str(failure.value).splitlines()[0]
    assert first_line == (
        "tests.scenarios.launch:fails_with_a_cause on 1 ranks failed (exit 1): rank0: Exception: Failed to write "
        "dataset materials to the data cache directory. / Please retry. <- FileNotFoundError: [Errno 2] No such file "
        f"or directory: '{missing}'"
    )
    assert "Traceback (most recent call last):" in str(failure.value)  # the whole traceback follows


def test_exception_lines_of_a_traceback_raised_while_handling_another():
    text = (
        "Traceback (most recent call last):\n"
        '  File "a.py", line 3, in <module>\n'
        "    1 / 0\n"
        "ZeroDivisionError: division by zero\n"
        "\n"
        "During handling of the above exception, another exception occurred:\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "a.py", line 5, in <module>\n'
        '    {}["k"]\n'
        "    ~~^^^^^\n"
        "KeyError: 'k'\n"
    )
    assert exception_lines(text) == ["KeyError: 'k'", "ZeroDivisionError: division by zero"]
    assert exception_lines("") == []
