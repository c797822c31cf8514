"""Numeric option types for the command lines: a bad value is argparse's error (exit 2) at parse time,
naming the option, not a failure (or a silently odd result) later."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _bounded(kind: type, low, inclusive: bool) -> Callable[[str], object]:
    relation = ">=" if inclusive else ">"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or (value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"must be {'finite and ' if kind is float else ''}{relation} {low}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__}{relation}{low}"  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, 1, inclusive=True)
positive_float = _bounded(float, 0.0, inclusive=False)
non_negative_float = _bounded(float, 0.0, inclusive=True)


def int_at_least(low: int) -> Callable[[str], int]:
    return _bounded(int, low, inclusive=True)
