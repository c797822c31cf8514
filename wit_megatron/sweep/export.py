"""Evaluation hand-off: every finished run's last save as a Hugging Face model in RUN/hf.

The converter of `wit-convert-megatron-to-hf` (weights, config, the tokenizer and chat template kept
with the save), written whole or not at all. Runs that have not finished are listed with their
status and left alone; a run already exported is not converted again unless `force`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wit_megatron.sweep.plan import CHECKPOINTS, HF, RunSpec, Sweep
from wit_megatron.sweep.status import run_state


@dataclass
class ExportResult:
    run: RunSpec
    outcome: str  # exported, already exported, not exported: <why>, failed: <error>
    hf: Path

    @property
    def ready(self) -> bool:
        return self.outcome in ("exported", "already exported")


def export(sweep: Sweep, force: bool = False) -> list[ExportResult]:
    from wit_megatron.checkpoint import CheckpointError
    from wit_megatron.convert.mcore_to_hf import convert_megatron_to_hf

    results = []
    for run in sweep.runs:
        run_dir = sweep.run_dir(run)
        hf = run_dir / HF
        state = run_state(run_dir)
        if state.status != "finished":
            outcome = f"not exported: {state}"
        elif (hf / "config.json").is_file() and not force:
            outcome = "already exported"
        else:
            try:
                convert_megatron_to_hf(run_dir / CHECKPOINTS, hf, force=force, progress=False)
                outcome = "exported"
            except CheckpointError as e:  # ConversionError is one
                outcome = f"failed: {e}"
        results.append(ExportResult(run, outcome, hf))
    return results
