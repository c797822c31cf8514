"""Regenerate the cross-version fixtures: a tiny Llama HF model and its Megatron checkpoint written by
each supported megatron-core version (run once per venv, from the repository root):

    python -m tests.scenarios.convert_fixtures
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.convert_models import build
from wit_megatron.runtime.compat import megatron_core_version

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "convert"


def main() -> None:
    from wit_megatron.convert.hf_to_mcore import convert_hf_to_megatron

    hf = FIXTURES / "tiny-llama-hf"
    if not hf.exists():
        build("llama_gqa_tied", hf, seed=11)
    version = ".".join(map(str, megatron_core_version()))
    out = FIXTURES / f"tiny-llama-mcore-{version}"
    shutil.rmtree(out, ignore_errors=True)
    convert_hf_to_megatron(hf, out, progress=False)


if __name__ == "__main__":
    main()
