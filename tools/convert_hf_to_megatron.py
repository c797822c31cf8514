#!/usr/bin/env python
"""Thin CLI: see wit_megatron/convert/cli.py (hf_to_megatron) and docs/convert.md."""

import sys

from wit_megatron.convert.cli import hf_to_megatron

if __name__ == "__main__":  # the checkpoint writer starts a helper process: keep the guard
    sys.exit(hf_to_megatron())
