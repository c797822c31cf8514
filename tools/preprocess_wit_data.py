#!/usr/bin/env python
"""Instruction data -> WIT indexed dataset (tokens + per-token roles). Same as `wit-preprocess-data`;
see `--help` and docs/data.md."""

import sys

from wit_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
