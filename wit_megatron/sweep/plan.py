"""A λ sweep planned on disk: one run directory per grid point, the scripts that run them, sweep.json.

Every run gets the same training arguments (model, data, seed, token budget) and differs only in
(λ_p, λ_r): λ is applied when the dataset is read, so one preprocessing (and one cached sample index)
serves the whole grid. The directory the plan writes:

    DIR/sweep.json              the plan (read by collect, plot, export)
    DIR/README.md               how to run, collect, plot, export and evaluate; one lm_eval command per run
    DIR/sweep.sh                every run, one after another, on this machine
    DIR/sweep.sbatch            a Slurm job array: task i runs run i (requeue resumes); its output in DIR/slurm/
    DIR/runs/NAME/run.sh        one run (NAME = p<λ_p>_r<λ_r>): resumes from its last save, skips itself
                                once finished; its output in train.log, TensorBoard in tensorboard/,
                                saves in checkpoints/, later the HF export in hf/ and lm_eval's in lm-eval/
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

SWEEP_FILE = "sweep.json"
RUNS = "runs"
# Inside a run directory:
RUN_SCRIPT = "run.sh"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
HF = "hf"
LM_EVAL = "lm-eval"

# Training options the sweep sets per run (dest -> why the plan refuses them among the shared arguments).
PER_RUN_OPTIONS = {
    "lambda_prompt": "--lambda-prompt comes from the grid (--lambda-prompt of wit-sweep plan)",
    "lambda_response": "--lambda-response comes from the grid (--lambda-response of wit-sweep plan)",
    "save": "--save: each run saves to its own RUN/checkpoints",
    "tensorboard_dir": "--tensorboard-dir: each run writes TensorBoard events to its own RUN/tensorboard",
    "save_hf": "--save-hf: `wit-sweep export` writes each finished run's HF model to RUN/hf",
    "wandb_exp_name": "--wandb-exp-name: each run is named after its grid point",
}
FORMAT_VERSION = 1


class SweepError(ValueError):
    """A sweep that cannot be planned or read as asked."""


def parse_values(text: str, option: str) -> list[float]:
    """'0,0.5,1' or an arithmetic progression written out as '0,0.2,...,1' -> sorted λ values."""
    items = [item.strip() for item in text.split(",")]
    try:
        if "..." in items:
            if len(items) != 4 or items[2] != "...":
                raise SweepError(f"{option} {text!r}: a progression is written 'FIRST,SECOND,...,LAST', e.g. 0,0.2,...,1")
            first, second, last = float(items[0]), float(items[1]), float(items[3])
            step = second - first
            steps = (last - first) / step if step > 0 else -1.0
            if step <= 0 or steps < 1 or abs(steps - round(steps)) > 1e-6:
                raise SweepError(f"{option} {text!r}: {last:g} is not reached from {first:g} in steps of {step:g}")
            values = [float(f"{first + i * step:.12g}") for i in range(round(steps) + 1)]
        else:
            values = [float(item) for item in items]
    except ValueError as e:
        if isinstance(e, SweepError):
            raise
        raise SweepError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0,0.5,1 or 0,0.2,...,1") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise SweepError(f"{option} {text!r}: λ must be finite and >= 0, got {bad[0]}")
    if len(set(values)) != len(values):
        raise SweepError(f"{option} {text!r}: a value appears twice")
    return sorted(values)


def run_name(lambda_prompt: float, lambda_response: float) -> str:
    return f"p{lambda_prompt:g}_r{lambda_response:g}"


@dataclass(frozen=True)
class RunSpec:
    name: str
    lambda_prompt: float
    lambda_response: float


@dataclass
class Sweep:
    """A planned sweep: what DIR/sweep.json holds (paths in it are absolute, except run directories,
    which are DIR/runs/NAME wherever DIR is)."""

    directory: Path
    runs: list[RunSpec]
    lambda_prompt: list[float]
    lambda_response: list[float]
    skipped: list[tuple[float, float]]
    train_args: list[str]  # the shared pretrain_wit.py arguments, without --load/--finetune
    base_load: list[str]  # ["--load", BASE] (+ "--finetune"): how a run starts; it resumes from its own save
    workdir: str  # where relative paths in train_args resolve: each run starts there
    python: str
    entry: str  # examples/pretrain_wit.py
    nproc_per_node: int
    nodes: int
    eval_tasks: str
    slurm_options: list[str] = field(default_factory=list)

    def run_dir(self, run: RunSpec) -> Path:
        return self.directory / RUNS / run.name

    def run_args(self, run: RunSpec, run_dir: str) -> list[str]:
        """The training arguments of `run` whose directory is `run_dir` (after its --load)."""
        args = self.train_args + ["--lambda-prompt", f"{run.lambda_prompt!r}", "--lambda-response", f"{run.lambda_response!r}",
                                  "--save", f"{run_dir}/{CHECKPOINTS}", "--tensorboard-dir", f"{run_dir}/{TENSORBOARD}"]
        if "--wandb-project" in self.train_args or any(a.startswith("--wandb-project=") for a in self.train_args):
            args += ["--wandb-exp-name", run.name]
        return args

    def lm_eval_command(self, run: RunSpec) -> str:
        run_dir = self.run_dir(run)
        return (f"lm_eval --model hf --model_args pretrained={run_dir / HF} --tasks {self.eval_tasks} "
                f"--batch_size auto --output_path {run_dir / LM_EVAL}")

    def write_json(self, path: Path) -> None:
        data = asdict(self)
        data = {"format": FORMAT_VERSION, **{k: v for k, v in data.items() if k != "directory"}}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Sweep":
        path = Path(directory) / SWEEP_FILE
        if not path.is_file():
            raise SweepError(f"{directory}: no {SWEEP_FILE}; is it a directory written by `wit-sweep plan`?")
        try:
            data = json.loads(path.read_text())
            version = data.pop("format", None)
            if version != FORMAT_VERSION:
                raise SweepError(f"{path}: written by another wit-megatron version (format {version}, this one reads "
                                 f"{FORMAT_VERSION})")
            data["runs"] = [RunSpec(**run) for run in data["runs"]]
            data["skipped"] = [tuple(point) for point in data["skipped"]]
            return cls(directory=Path(directory).resolve(), **data)
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, SweepError):
                raise
            raise SweepError(f"{path}: not a valid sweep plan ({type(e).__name__}: {e})") from None


@dataclass
class PlanConfig:
    out: Path
    lambda_prompt: list[float]
    lambda_response: list[float]
    train_args: list[str]
    skip: list[tuple[float, float]] = field(default_factory=list)
    nproc_per_node: int = 8
    nodes: int = 1
    entry: Optional[Path] = None  # default: examples/pretrain_wit.py of this checkout
    python: str = sys.executable
    eval_tasks: str = "mmlu"
    slurm_options: list[str] = field(default_factory=list)
    check: bool = True  # check the training arguments as pretrain_wit.py would, before writing anything


def default_entry() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "pretrain_wit.py"


def plan(config: PlanConfig) -> Sweep:
    """Check the grid and the shared training arguments, then write the sweep directory (whole or not at all)."""
    from wit_megatron.output import OutputKind, atomic_output_dir
    from wit_megatron.sweep import scripts

    out = Path(config.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SweepError(f"--out {config.out} exists and is not empty; give a new directory (a planned sweep is never "
                         "overwritten: its runs may hold results)")
    if config.nproc_per_node < 1 or config.nodes < 1:
        raise SweepError("--nproc-per-node and --nodes must be >= 1")
    entry = Path(config.entry or default_entry()).resolve()
    if not entry.is_file():
        raise SweepError(f"the training entry point {entry} does not exist; give --entry PATH/TO/examples/pretrain_wit.py")
    train_args, base_load, extra = split_train_args(config.train_args)
    runs = grid_runs(config.lambda_prompt, config.lambda_response, config.skip, extra)
    sweep = Sweep(directory=out, runs=runs, lambda_prompt=list(config.lambda_prompt),
                  lambda_response=list(config.lambda_response), skipped=[tuple(p) for p in config.skip],
                  train_args=train_args, base_load=base_load, workdir=os.getcwd(), python=config.python, entry=str(entry),
                  nproc_per_node=config.nproc_per_node, nodes=config.nodes, eval_tasks=config.eval_tasks,
                  slurm_options=list(config.slurm_options))
    if config.check:
        check_train_args(sweep)
    # An existing --out is an empty directory here (checked above): replacing it loses nothing.
    sweep_dir = OutputKind("sweep directory", lambda path: (path / SWEEP_FILE).is_file())
    with atomic_output_dir(out, force=out.exists(), inputs=[], kind=sweep_dir) as tmp:
        for run in runs:
            run_dir = tmp / RUNS / run.name
            run_dir.mkdir(parents=True)
            _write_script(run_dir / RUN_SCRIPT, scripts.run_script(sweep, run))
        (tmp / "slurm").mkdir()
        _write_script(tmp / "sweep.sh", scripts.sequential_script(sweep))
        _write_script(tmp / "sweep.sbatch", scripts.slurm_array_script(sweep))
        (tmp / "README.md").write_text(scripts.readme(sweep))
        sweep.write_json(tmp / SWEEP_FILE)
    return sweep


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str], dict]:
    """The shared arguments without --load/--finetune (a run resumes from its own save, where the base
    model's --finetune must not apply), those, and the fixed λ of other roles. Refuses the options the
    sweep sets per run."""
    from wit_megatron.training.arguments import build_parser

    parser = build_parser()
    parser.prog = "wit-sweep plan ... -- (examples/pretrain_wit.py arguments)"
    unset = object()
    for action in parser._actions:
        if action.dest in PER_RUN_OPTIONS:
            action.default = unset
    parsed = parser.parse_args(list(argv))  # argparse's message and exit 2 on an unknown option
    given = [why for dest, why in PER_RUN_OPTIONS.items() if getattr(parsed, dest) is not unset]
    if given:
        raise SweepError("the training arguments set what the sweep sets per run: " + "; ".join(given))
    shared, load, rest = [], [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--load" and rest:
            load += [token, rest.pop(0)]
        elif token.startswith("--load="):
            load += ["--load", token.split("=", 1)[1]]
        elif token == "--finetune":
            load.append(token)
        else:
            shared.append(token)
    if load and not Path(load[1]).is_absolute():
        load[1] = os.path.abspath(load[1])
    roles = {role: getattr(parsed, f"lambda_{role}") for role in ("system", "user", "tool")}
    return shared, load, roles


def grid_runs(prompt: Sequence[float], response: Sequence[float], skip: Sequence[tuple[float, float]],
              other_roles: dict) -> list[RunSpec]:
    """One run per (λ_p, λ_r) not skipped; a grid point where every λ is 0 must be skipped explicitly."""
    from wit_megatron.roles import RoleWeights

    points = [(p, r) for p in prompt for r in response]
    for point in skip:
        if tuple(point) not in points:
            raise SweepError(f"--skip {point[0]:g},{point[1]:g} is not a point of the grid")
    runs = []
    for p, r in points:
        if (p, r) in {tuple(s) for s in skip}:
            continue
        try:
            RoleWeights(p, r, **other_roles)
        except ValueError as e:
            raise SweepError(f"grid point λ_p {p:g}, λ_r {r:g}: {e}; leave it out with --skip {p:g},{r:g}") from None
        runs.append(RunSpec(run_name(p, r), p, r))
    if len({run.name for run in runs}) != len(runs):
        raise SweepError("two grid points give the same run name: λ values must differ in their first 6 digits")
    if not runs:
        raise SweepError("the grid has no run left")
    return runs


def check_train_args(sweep: Sweep) -> None:
    """The first run's arguments through pretrain_wit.py's own checks (files, layout at nodes x
    processes, options), so that a mistake fails here rather than in every run of the array."""
    from wit_megatron.training.arguments import parse_args

    run = sweep.runs[0]
    cwd = os.getcwd()
    try:
        os.chdir(sweep.workdir)
        parse_args(sweep.base_load + sweep.run_args(run, str(sweep.run_dir(run))), world_size=sweep.nodes * sweep.nproc_per_node)
    finally:
        os.chdir(cwd)


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)
