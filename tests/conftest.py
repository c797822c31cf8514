import os
from pathlib import Path

# Rank-side test code (tests/scenarios) is imported by the subprocess that run_distributed starts.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
