"""docs/reliability.md is the rendering of the case tables the reliability tests run (tests/reliability.py)."""

from pathlib import Path

from tests.reliability import render

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_table_is_the_tests_table():
    assert (ROOT / "docs/reliability.md").read_text() == render(), \
        "docs/reliability.md is stale: python -m tests.reliability > docs/reliability.md"
