#!/usr/bin/env python
"""Thin CLI: see wit_megatron/convert/cli.py (megatron_to_hf) and docs/convert.md."""

import sys

from wit_megatron.convert.cli import megatron_to_hf

if __name__ == "__main__":  # the checkpoint writer starts a helper process: keep the guard
    sys.exit(megatron_to_hf())
