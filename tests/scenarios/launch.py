"""Rank side of tests/test_launch.py."""

from __future__ import annotations


def fails_with_a_cause(path: str) -> None:
    """Raises as megatron-core's dataset builder does around a failed write: an OSError, wrapped."""
    try:
        open(path, "w")
    except OSError as err:
        raise Exception("Failed to write dataset materials to the data cache directory.\nPlease retry.") from err
