#!/usr/bin/env python
"""Thin CLI: see wit_megatron/convert/cli.py (verify) and docs/convert.md."""

import sys

from wit_megatron.convert.cli import verify

if __name__ == "__main__":  # the checkpoint writer starts a helper process: keep the guard
    sys.exit(verify())
