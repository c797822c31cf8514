"""`wit-sweep`: plan, status, collect, plot, export (argument parsing only; the work is in the modules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from wit_megatron.sweep.plan import SweepError


def _point(text: str) -> tuple[float, float]:
    try:
        p, r = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected λ_p,λ_r, e.g. 0,0") from None
    return p, r


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wit-sweep", description="WIT λ sweeps: plan a (λ_p, λ_r) grid of training runs, "
                                     "run it (sweep.sh or a Slurm array), collect a results table, plot the heatmap, "
                                     "export finished runs to Hugging Face for lm-evaluation-harness.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="write one run per grid point and the scripts that run them",
                       usage="wit-sweep plan --lambda-prompt LIST --lambda-response LIST --out DIR [options] -- "
                       "PRETRAIN_WIT_ARGUMENTS", description="Write DIR: one run per (λ_p, λ_r) (its own save, log and "
                       "TensorBoard directories; the same model, data, seed and token budget), sweep.sh (one run after "
                       "another), sweep.sbatch (a Slurm array), README.md. Arguments after -- go to every run of "
                       "examples/pretrain_wit.py; they are checked as it checks them first.")
    p.add_argument("--lambda-prompt", required=True, help="λ_p values: 0,0.5,1 or a progression 0,0.2,...,1")
    p.add_argument("--lambda-response", required=True, help="λ_r values, as --lambda-prompt")
    p.add_argument("--skip", type=_point, action="append", default=[], metavar="P,R",
                   help="leave out a grid point (repeatable), e.g. --skip 0,0 (all weights 0 trains nothing)")
    p.add_argument("--out", required=True, type=Path, help="the sweep directory (new or empty)")
    p.add_argument("--nproc-per-node", type=int, default=8, help="training processes (GPUs) per node and run")
    p.add_argument("--nodes", type=int, default=1, help="nodes per run (Slurm)")
    p.add_argument("--entry", type=Path, default=None, help="examples/pretrain_wit.py (default: this checkout's)")
    p.add_argument("--python", default=sys.executable, help="the interpreter runs start with (default: this one)")
    p.add_argument("--eval-tasks", default="mmlu", help="lm-evaluation-harness tasks in README's lm_eval commands")
    p.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH line for sweep.sbatch (repeatable), e.g. --slurm-option=--partition=gpu "
                   "--slurm-option=--time=12:00:00")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not check the training arguments here (e.g. paths that exist only on the cluster)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then examples/pretrain_wit.py's arguments")

    p = sub.add_parser("status", help="one run's status (what run.sh asks before it starts)")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("collect", help="DIR/results.csv and results.json: every run, its status and results")
    p.add_argument("directory", type=Path)

    p = sub.add_parser("plot", help="the heatmap of one metric over the grid (PNG and SVG)")
    p.add_argument("directory", type=Path)
    p.add_argument("--metric", required=True, help="a column of the table, e.g. valid_response_nll or mmlu/acc")
    p.add_argument("--out", type=Path, default=None, help="output prefix (default DIR/heatmap_METRIC)")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher_is_better", action="store_true", default=None)
    direction.add_argument("--lower-is-better", dest="higher_is_better", action="store_false")

    p = sub.add_parser("export", help="every finished run's last save -> RUN/hf (Hugging Face), and its lm_eval command")
    p.add_argument("directory", type=Path)
    p.add_argument("--force", action="store_true", help="export again over existing RUN/hf directories")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _plan(args) -> int:
    from wit_megatron.sweep.plan import PlanConfig, parse_values, plan

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    sweep = plan(PlanConfig(out=args.out, lambda_prompt=parse_values(args.lambda_prompt, "--lambda-prompt"),
                            lambda_response=parse_values(args.lambda_response, "--lambda-response"), train_args=train_args,
                            skip=args.skip, nproc_per_node=args.nproc_per_node, nodes=args.nodes, entry=args.entry,
                            python=args.python, eval_tasks=args.eval_tasks, slurm_options=args.slurm_option,
                            check=args.check))
    print(f"planned {len(sweep.runs)} runs in {sweep.directory}: bash {sweep.directory}/sweep.sh, or sbatch "
          f"{sweep.directory}/sweep.sbatch; then wit-sweep collect {sweep.directory} (see its README.md)")
    return 0


def _status(args) -> int:
    from wit_megatron.sweep.status import run_state

    print(run_state(args.run_dir))
    return 0


def _collect(args) -> int:
    from wit_megatron.sweep.collect import collect, summary, write
    from wit_megatron.sweep.plan import Sweep

    table = collect(Sweep.read(args.directory))
    csv_path, json_path = write(table, args.directory)
    print(summary(table))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _plot(args) -> int:
    from wit_megatron.sweep.collect import collect
    from wit_megatron.sweep.heatmap import draw
    from wit_megatron.sweep.plan import Sweep

    table = collect(Sweep.read(args.directory))
    out = args.out or args.directory / f"heatmap_{args.metric.replace('/', '_')}"
    try:
        heatmap = draw(table, args.metric, out, args.higher_is_better)
    except (KeyError, ValueError) as e:
        raise SweepError(str(e).strip('"')) from None
    best = f"best: λ_p {heatmap.best[0]:g}, λ_r {heatmap.best[1]:g}" if heatmap.best else "no finished run has a value"
    print(f"wrote {heatmap.png} and {heatmap.svg} ({best})")
    return 0


def _export(args) -> int:
    from wit_megatron.sweep.export import export
    from wit_megatron.sweep.plan import Sweep

    sweep = Sweep.read(args.directory)
    results = export(sweep, force=args.force)
    for result in results:
        print(f"{result.run.name}: {result.outcome}")
    ready = [r for r in results if r.ready]
    if ready:
        print("\nevaluate with lm-evaluation-harness (wit-sweep collect picks up its results):")
        for result in ready:
            print(f"  {sweep.lm_eval_command(result.run)}")
    return 1 if any(r.outcome.startswith("failed") for r in results) else 0


COMMANDS = {"plan": _plan, "status": _status, "collect": _collect, "plot": _plot, "export": _export}


if __name__ == "__main__":
    sys.exit(main())
