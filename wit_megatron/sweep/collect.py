"""The table of a sweep: one row per planned run, whatever its state (nothing dropped).

Per run: λ_p, λ_r, status and its detail (status.py), iterations and tokens seen, the last logged
training losses (`lm loss` is the WIT loss, which depends on λ; `prompt nll` and `response nll` do
not, so they compare runs), the last validation's, the last save, the HF export, and every
lm-evaluation-harness metric found in the run's directory (lm_eval.py). Written as DIR/results.csv
and DIR/results.json (which also says, per column, whether higher is better).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wit_megatron.sweep.lm_eval import read_results
from wit_megatron.sweep.plan import HF, Sweep
from wit_megatron.sweep.status import run_state

# Column -> whether higher is better (None: not a score).
CORE_COLUMNS = {
    "run": None, "lambda_prompt": None, "lambda_response": None, "status": None, "detail": None, "attempts": None,
    "iteration": None, "train_iters": None, "consumed_samples": None, "tokens_seen": None,
    "train_lm_loss": False, "train_prompt_nll": False, "train_response_nll": False,
    "valid_iteration": None, "valid_lm_loss": False, "valid_prompt_nll": False, "valid_response_nll": False,
    "saved_iteration": None, "hf": None,
}
LOG_KEYS = {"lm_loss": "lm loss", "prompt_nll": "prompt nll", "response_nll": "response nll"}


@dataclass
class Table:
    columns: list[str]
    rows: list[dict]
    higher_is_better: dict[str, Optional[bool]]
    skipped: list[tuple[float, float]]
    lambda_prompt: list[float]
    lambda_response: list[float]

    def metric(self, name: str) -> list[Optional[float]]:
        if name not in self.columns:
            raise KeyError(name)
        return [row.get(name) for row in self.rows]


def collect(sweep: Sweep) -> Table:
    rows, directions = [], dict(CORE_COLUMNS)
    eval_columns: list[str] = []
    for run in sweep.runs:
        run_dir = sweep.run_dir(run)
        state = run_state(run_dir)
        row = {"run": run.name, "lambda_prompt": run.lambda_prompt, "lambda_response": run.lambda_response,
               "status": state.status, "detail": state.detail, "saved_iteration": state.saved_iteration,
               "hf": str(run_dir / HF) if (run_dir / HF / "config.json").is_file() else None}
        log = state.log
        if log is not None:
            row["attempts"] = len(log.attempts)
            if log.train:
                last = log.train[-1]
                row.update(iteration=last["iteration"], train_iters=last["train_iters"],
                           consumed_samples=last.get("consumed samples"), tokens_seen=log.tokens_seen,
                           **{f"train_{key}": last.get(name) for key, name in LOG_KEYS.items()})
            if log.valid:
                last = log.valid[-1]
                row.update(valid_iteration=last["iteration"],
                           **{f"valid_{key}": last.get(f"{name} value") for key, name in LOG_KEYS.items()})
        results = read_results(run_dir)
        row.update(results.values)
        for name, better in results.higher_is_better.items():
            if name not in eval_columns:
                eval_columns.append(name)
            if directions.get(name) is None:
                directions[name] = better
        if results.problems:
            row["detail"] = "; ".join(filter(None, [row["detail"], *results.problems]))
        rows.append(row)
    columns = list(CORE_COLUMNS) + sorted(eval_columns)
    return Table(columns, rows, {c: directions.get(c) for c in columns}, list(sweep.skipped), list(sweep.lambda_prompt),
                 list(sweep.lambda_response))


def write(table: Table, directory: Path) -> tuple[Path, Path]:
    """DIR/results.csv and DIR/results.json, each replaced whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table.columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in table.columns})
    data = {"columns": table.columns, "higher_is_better": table.higher_is_better, "lambda_prompt": table.lambda_prompt,
            "lambda_response": table.lambda_response, "skipped": table.skipped,
            "runs": [{c: row.get(c) for c in table.columns} for row in table.rows]}
    paths = Path(directory) / "results.csv", Path(directory) / "results.json"
    for path, text in zip(paths, (buffer.getvalue(), json.dumps(data, indent=2, ensure_ascii=False) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def summary(table: Table) -> str:
    """The table as text: the core columns, then each run's detail."""
    shown = ["run", "status", "iteration", "tokens_seen", "train_lm_loss", "valid_prompt_nll", "valid_response_nll"]
    cells = [shown] + [[_cell(row, c) for c in shown] for row in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(shown))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines += [f"{row['run']}: {row['status']}: {row['detail']}" for row in table.rows if row.get("detail")]
    evals = [c for c in table.columns if c not in CORE_COLUMNS]
    if evals:
        lines.append(f"lm-eval columns ({len(evals)}): " + ", ".join(evals[:8]) + (", ..." if len(evals) > 8 else ""))
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if column == "iteration" and row.get("train_iters") is not None:
        return f"{value}/{row['train_iters']}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
