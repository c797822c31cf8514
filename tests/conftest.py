import os
from pathlib import Path

import pytest

# Rank-side test code (tests/scenarios) is imported by the subprocess that run_distributed starts.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def training_data(tmp_path_factory) -> dict:
    """HumanEval preprocessed with SmolLM2's tokenizer and a tiny random Llama with its vocabulary, as HF
    and converted (tests/training_data.py), built once per session for the training tests."""
    from tests.training_data import build_training_data

    return build_training_data(tmp_path_factory.mktemp("training"))
