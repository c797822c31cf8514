"""The text of a sweep's scripts and README (plan.py writes them).

run.sh is where a run's life is decided, so that sweep.sh and sweep.sbatch only choose which runs
to start: it skips a finished run (asking `wit-sweep status`, the same reading of train.log that
collect uses), resumes from the run's last save, appends the training output to train.log between
"=== attempt started" and "=== attempt ended: exit status N" lines, and exits with the training's
status. Under Slurm (WIT_SWEEP_SLURM=1, set by sweep.sbatch) it launches one torchrun agent per node
with srun, meeting at a c10d rendezvous on the first node; otherwise one standalone torchrun here.
"""

from __future__ import annotations

import shlex

from wit_megatron.sweep.plan import CHECKPOINTS, HF, LM_EVAL, LOG, RUN_SCRIPT, RUNS, RunSpec, Sweep

q = shlex.quote


_RUN = "\0RUN"  # stands for the run's directory in its arguments; run.sh writes "$RUN" there


def _array(values) -> str:
    return " ".join('"$RUN"' + q(v[len(_RUN):]) if v.startswith(_RUN) else q(str(v)) for v in values)


def run_script(sweep: Sweep, run: RunSpec) -> str:
    return f"""#!/usr/bin/env bash
# One run of the WIT λ sweep in {sweep.directory}: λ_p = {run.lambda_prompt:g}, λ_r = {run.lambda_response:g}.
# Output: train.log (appended, one "=== attempt" block per start), TensorBoard events in tensorboard/,
# saves in checkpoints/. Started again, it resumes from its last save; once finished it does nothing.
# WIT_SWEEP_NPROC_PER_NODE and WIT_SWEEP_PYTHON override the plan's (names of their own: a generic
# PYTHON or NPROC_PER_NODE in the caller's environment must not change what runs); WIT_SWEEP_SLURM=1
# (sweep.sbatch) launches with srun.
set -uo pipefail
RUN="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PYTHON=${{WIT_SWEEP_PYTHON:-{q(sweep.python)}}}
NPROC=${{WIT_SWEEP_NPROC_PER_NODE:-{sweep.nproc_per_node}}}
ENTRY={q(sweep.entry)}
cd {q(sweep.workdir)} || exit 1  # relative paths in the arguments were given from here

STATUS=$("$PYTHON" -m wit_megatron.sweep.cli status "$RUN") || exit 1
if [[ "$STATUS" == finished* ]]; then
  echo "$RUN: $STATUS; not run again"
  exit 0
fi

ARGS=({_array(sweep.run_args(run, _RUN))})
LOAD=({_array(sweep.base_load)})
if [[ -f "$RUN/{CHECKPOINTS}/latest_checkpointed_iteration.txt" ]]; then
  LOAD=(--load "$RUN/{CHECKPOINTS}")  # resume: the last complete save
fi

launch() {{
  if [[ "${{WIT_SWEEP_SLURM:-0}}" == 1 ]]; then
    local master
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    local port=${{MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
    srun --kill-on-bad-exit=1 bash -c "$(printf '%q ' "$PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES") \\
--node-rank \\$SLURM_NODEID $(printf '%q ' --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "$master:$port" \\
--rdzv-id "$SLURM_JOB_ID" "$@")"
  else
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"
  fi
}}

where="$(hostname)${{SLURM_JOB_ID:+, Slurm job ${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}${{SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}}}"
echo "=== attempt started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $where: ${{LOAD[*]}}" >> "$RUN/{LOG}"
launch "$ENTRY" "${{LOAD[@]}}" "${{ARGS[@]}}" >> "$RUN/{LOG}" 2>&1
status=$?
echo "=== attempt ended $(date -u +%Y-%m-%dT%H:%M:%SZ): exit status $status" >> "$RUN/{LOG}"
exit $status
"""


def sequential_script(sweep: Sweep) -> str:
    runs = _array(f"{RUNS}/{run.name}" for run in sweep.runs)
    return f"""#!/usr/bin/env bash
# The WIT λ sweep in this directory, one run after another on this machine ({sweep.nproc_per_node} processes each;
# WIT_SWEEP_NPROC_PER_NODE overrides). A failed run does not stop the others; a finished run is not run again and a
# stopped one resumes, so this script can simply be started again. Stops when a run is interrupted
# (exit status 130/143). Exit status: 1 if any run failed. Then: wit-sweep collect "$(dirname "$0")".
set -uo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
failed=0
for run in {runs}; do
  echo "=== $run"
  bash "$DIR/$run/{RUN_SCRIPT}"
  status=$?
  case $status in
    0) ;;
    130|143) echo "=== $run interrupted (exit status $status): stopping the sweep"; exit $status ;;
    *) echo "=== $run failed (exit status $status); see $DIR/$run/{LOG}"; failed=1 ;;
  esac
done
exit $failed
"""


def slurm_array_script(sweep: Sweep) -> str:
    runs = _array(f"{RUNS}/{run.name}" for run in sweep.runs)
    options = "".join(f"#SBATCH {option}\n" for option in sweep.slurm_options)
    return f"""#!/bin/bash
# The WIT λ sweep in {sweep.directory} as a Slurm job array: task i runs run i of RUNS below, on
# {sweep.nodes} node(s) x {sweep.nproc_per_node} GPUs. Submit all runs, or some by index:
#   sbatch {sweep.directory}/sweep.sbatch
#   sbatch --array=2,5 {sweep.directory}/sweep.sbatch
# Training output goes to each run's train.log; this job's own output to slurm/.
#SBATCH --job-name=wit-sweep
#SBATCH --array=0-{len(sweep.runs) - 1}
#SBATCH --nodes={sweep.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={sweep.nproc_per_node}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output={sweep.directory}/slurm/%A_%a.out
{options}# --signal: SIGTERM 300 s before the time limit; the run saves and exits 143. --requeue (or a
# resubmission) starts run.sh again, which resumes from that save.
set -euo pipefail
RUNS=({runs})
export WIT_SWEEP_SLURM=1
export WIT_SWEEP_NPROC_PER_NODE=${{WIT_SWEEP_NPROC_PER_NODE:-{sweep.nproc_per_node}}}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # what Megatron-Core expects on NVIDIA GPUs
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-280}}  # let workers save after SIGTERM
exec bash {q(str(sweep.directory))}/"${{RUNS[$SLURM_ARRAY_TASK_ID]}}"/{RUN_SCRIPT}
"""


def readme(sweep: Sweep) -> str:
    d = sweep.directory
    grid = f"λ_p ∈ {{{', '.join(f'{v:g}' for v in sweep.lambda_prompt)}}} × λ_r ∈ {{{', '.join(f'{v:g}' for v in sweep.lambda_response)}}}"
    skipped = "; skipped: " + ", ".join(f"({p:g}, {r:g})" for p, r in sweep.skipped) if sweep.skipped else ""
    rows = "\n".join(f"| `{run.name}` | {run.lambda_prompt:g} | {run.lambda_response:g} | `{sweep.lm_eval_command(run)}` |"
                     for run in sweep.runs)
    shared = " ".join(q(a) for a in sweep.base_load + sweep.train_args)
    return f"""# WIT λ sweep: {len(sweep.runs)} runs

Grid {grid}{skipped}. Every run trains from the same model on the same data, seed and token budget:

    {shared}

(from `{sweep.workdir}`, {sweep.nodes} node(s) × {sweep.nproc_per_node} processes), plus its own
`--lambda-prompt`, `--lambda-response`, `--save runs/NAME/{CHECKPOINTS}` and
`--tensorboard-dir runs/NAME/tensorboard`. λ is applied when the data is read: one preprocessing serves
the grid.

## Run

    bash {d}/sweep.sh                 # one run after another on this machine
    sbatch {d}/sweep.sbatch           # a Slurm job array, one task per run (sbatch --array=2,5 ... for some)

Each run writes `runs/NAME/{LOG}`; starting a run again resumes it from its last save (a finished run is
not run again), so either script can be started again after a failure or a time limit.

## Results

    wit-sweep collect {d}                                # results.csv and results.json: every run, its status
    wit-sweep plot {d} --metric valid_response_nll       # heatmap_valid_response_nll.png/.svg
    wit-sweep export {d}                                 # every finished run's last save -> runs/NAME/{HF}

Then evaluate each exported run with lm-evaluation-harness; `wit-sweep collect` picks up the result
JSONs it writes under `runs/NAME/{LM_EVAL}` (one column per task and metric, e.g. `mmlu/acc`), and
`wit-sweep plot {d} --metric mmlu/acc` draws them:

| run | λ_p | λ_r | evaluation |
|---|---|---|---|
{rows}
"""
