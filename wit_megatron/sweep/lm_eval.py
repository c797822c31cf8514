"""lm-evaluation-harness results found in a run's directory, as table columns.

`lm_eval ... --output_path RUN/lm-eval` (0.4) writes RUN/lm-eval/<model name>/results_<date>.json:

    {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.58, "acc_stderr,none": 0.01, ...}, ...},
     "groups": {...}, "higher_is_better": {"arc_easy": {"acc": true, ...}}, "versions": {...},
     "n-shot": {...}, "config": {"model": "hf", "model_args": "pretrained=...", ...}, "date": 1.7e9, ...}

Each task metric becomes one column "TASK/METRIC", lm-eval's ",none" filter suffix dropped
("arc_easy/acc", "arc_easy/acc_stderr", "gsm8k/exact_match,strict-match"). Where several result files
give the same column, the newest evaluation (its "date", else the file's time) wins. Other JSON files
are not lm-eval's and are left alone; a results_*.json that cannot be read is reported, not skipped silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from wit_megatron.sweep.plan import CHECKPOINTS, HF, TENSORBOARD

NOT_SEARCHED = {CHECKPOINTS, HF, TENSORBOARD}  # a run's large directories hold no evaluation results


@dataclass
class EvalResults:
    values: dict[str, float] = field(default_factory=dict)  # column -> value
    higher_is_better: dict[str, Optional[bool]] = field(default_factory=dict)  # column -> direction (None: unknown)
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def column(task: str, key: str) -> str:
    return f"{task}/{key.removesuffix(',none')}"


def is_lm_eval_result(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and any(
        k in data for k in ("versions", "config", "n-shot", "higher_is_better"))


def read_results(run_dir: Path) -> EvalResults:
    run_dir = Path(run_dir)
    out = EvalResults()
    found = []  # (date, path, data)
    for path in sorted(_json_files(run_dir)):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if path.name.startswith("results"):
                out.problems.append(f"{path.relative_to(run_dir)}: not readable JSON ({e})")
            continue
        if is_lm_eval_result(data):
            date = data.get("date")
            found.append((float(date) if isinstance(date, (int, float)) else path.stat().st_mtime, path, data))
    for _, path, data in sorted(found, key=lambda f: f[0]):  # oldest first: a newer evaluation overwrites
        out.files.append(str(path.relative_to(run_dir)))
        directions = data.get("higher_is_better") or {}
        for task, metrics in {**(data.get("groups") or {}), **data["results"]}.items():
            if not isinstance(metrics, dict):
                continue
            for key, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue  # the alias, and "N/A" standard errors
                name = column(task, key)
                out.values[name] = float(value)
                metric = key.split(",")[0]
                out.higher_is_better[name] = None if metric.endswith("_stderr") else (directions.get(task) or {}).get(metric)
    return out


def _json_files(run_dir: Path):
    for path in run_dir.iterdir():
        if path.is_dir() and path.name not in NOT_SEARCHED:
            yield from path.rglob("*.json")
        elif path.suffix == ".json":
            yield path
