"""`wit-sweep` as users run it: plan a real 2x2 (λ_p, λ_r) grid of the training entry point (a tiny
random Llama with SmolLM2's vocabulary, converted, on 24 HumanEval records; 2 CPU iterations per run),
run it with the plan's own sweep.sh with one run made to fail, then collect, plot and export.

Proven here:
- every grid point is a run with the same arguments but its λ, save and TensorBoard directories; the
  failed run is in the table as failed with the error that ended it, not dropped;
- the table's losses are the run's own (its TensorBoard scalars, written by the training loop) and
  its token count the sum of the logged intervals;
- the heatmap's red frame is drawn on the cell of the table's best run, the failed cell is hatched;
- lm-evaluation-harness result files (synthetic, in lm-eval 0.4's layout) become one column per task
  metric and can be plotted;
- export writes each finished run's last save as a Hugging Face model that transformers loads, with
  the tokenizer and chat template, and the README's lm_eval command points at it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_data_preprocess import humaneval, write_jsonl
from wit_megatron.sweep import cli
from wit_megatron.sweep.plan import SweepError, parse_values

ROOT = Path(__file__).resolve().parents[1]
FAILING = "p1_r1"  # the run made to fail: its save directory is a file
# Generic names a caller's environment often holds (CI's own script sets PYTHON to a bare interpreter):
# the sweep's scripts must run the plan's interpreter and process count regardless.
UNRELATED_ENV = {**os.environ, "PYTHON": "/nonexistent/python", "NPROC_PER_NODE": "8"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """24 HumanEval records preprocessed with SmolLM2's tokenizer; a tiny random Llama with its vocabulary,
    as HF (with the tokenizer) and converted to Megatron."""
    import transformers

    from tests.convert_models import randomize
    from wit_megatron.data.preprocess import PreprocessConfig, run
    from wit_megatron.testing import smollm2

    tmp = tmp_path_factory.mktemp("sweep")
    prefix = str(tmp / "he24" / "he24")
    run(PreprocessConfig([write_jsonl(tmp / "he24.jsonl", humaneval()[:24])], prefix, str(smollm2.tokenizer_dir()),
                         max_length=129, progress=False), tokenizer=smollm2.load_tokenizer())
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, seed=3)
    hf = tmp / "tiny-hf"
    model.save_pretrained(hf)
    smollm2.load_tokenizer().save_pretrained(hf)
    converted = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out",
                                str(tmp / "tiny"), "--layer-spec", "local"], capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr[-3000:]
    return {"tmp": tmp, "data": prefix, "load": str(tmp / "tiny")}


@pytest.fixture(scope="module")
def sweep(tiny) -> dict:
    out = tiny["tmp"] / "grid"
    train = ["--load", tiny["load"], "--finetune", "--data-path", tiny["data"], "--split", "80,20,0", "--seq-length", "128",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-2",
             "--lr-warmup-iters", "0", "--eval-iters", "1", "--log-interval", "1", "--num-workers", "0",
             "--data-cache-path", str(tiny["tmp"] / "cache")]
    assert cli.main(["plan", "--lambda-prompt", "0.1,1", "--lambda-response", "0.5,1", "--out", str(out), "--nproc-per-node",
                     "1", "--", *train]) == 0
    (out / "runs" / FAILING / "checkpoints").write_text("not a directory\n")
    ran = subprocess.run(["bash", str(out / "sweep.sh")], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                         env=UNRELATED_ENV)
    return {"dir": out, "train": train, "ran": ran}


def test_plan_writes_one_run_per_grid_point_and_refuses_what_the_sweep_sets(tmp_path, sweep):
    plan = json.loads((sweep["dir"] / "sweep.json").read_text())
    assert [(r["lambda_prompt"], r["lambda_response"]) for r in plan["runs"]] == [(0.1, 0.5), (0.1, 1), (1, 0.5), (1, 1)]
    scripts = {name: (sweep["dir"] / "runs" / name / "run.sh").read_text() for name in ("p0.1_r0.5", "p1_r1")}
    for name, text in scripts.items():
        p, r = name[1:].split("_r")
        assert f"--lambda-prompt {float(p)!r} --lambda-response {float(r)!r}" in text
        assert '--save "$RUN"/checkpoints --tensorboard-dir "$RUN"/tensorboard' in text
        assert "--data-path " + sweep["train"][4] in text and "--train-iters 2" in text  # the same data and budget
    sbatch = (sweep["dir"] / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in sbatch and "RUNS=(runs/p0.1_r0.5 runs/p0.1_r1 runs/p1_r0.5 runs/p1_r1)" in sbatch

    assert parse_values("0,0.2,...,1", "--lambda-prompt") == [0, 0.2, 0.4, 0.6, 0.8, 1]
    for text, message in (("0,0.3,...,1", "not reached"), ("0,-1", "finite and >= 0"), ("0,0", "appears twice")):
        with pytest.raises(SweepError, match=message):
            parse_values(text, "--lambda-prompt")
    base = ["plan", "--lambda-prompt", "0,1", "--lambda-response", "0,1", "--out"]
    for extra, message in ((["--", *sweep["train"]], "grid point λ_p 0, λ_r 0: every λ is 0"),
                           (["--skip", "0,0", "--", *sweep["train"], "--lambda-prompt", "0.5"], "--lambda-prompt comes from the grid"),
                           (["--skip", "0,0", "--", *sweep["train"], "--save", "x"], "each run saves to its own"),
                           (["--skip", "2,0", "--", *sweep["train"]], "--skip 2,0 is not a point of the grid")):
        with pytest.raises(SweepError, match=message):
            from wit_megatron.sweep.plan import PlanConfig, plan

            args = cli.build_parser().parse_args(base + [str(tmp_path / "x")] + extra)
            plan(PlanConfig(out=args.out, lambda_prompt=parse_values(args.lambda_prompt, "p"),
                            lambda_response=parse_values(args.lambda_response, "r"), train_args=args.train_args[1:],
                            skip=args.skip, nproc_per_node=1))
        assert not (tmp_path / "x").exists()  # nothing written


def test_collect_reports_every_run_with_its_own_losses_and_the_failed_one(sweep, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sweep["ran"].returncode == 1, sweep["ran"].stdout[-3000:] + sweep["ran"].stderr[-3000:]
    assert f"=== runs/{FAILING} failed" in sweep["ran"].stdout
    assert cli.main(["collect", str(sweep["dir"])]) == 0
    table = json.loads((sweep["dir"] / "results.json").read_text())
    rows = {row["run"]: row for row in table["runs"]}
    with open(sweep["dir"] / "results.csv") as f:
        assert [row["run"] for row in csv.DictReader(f)] == list(rows) == ["p0.1_r0.5", "p0.1_r1", "p1_r0.5", "p1_r1"]
    failed, first = rows.pop(FAILING), {}
    assert failed["status"] == "failed" and failed["detail"].startswith("exit status ") and "checkpoints" in failed["detail"]
    for name, row in rows.items():
        assert row["status"] == "finished" and row["iteration"] == row["train_iters"] == 2 and row["saved_iteration"] == 2
        events = EventAccumulator(str(sweep["dir"] / "runs" / name / "tensorboard")).Reload()
        scalar = {tag: events.Scalars(tag)[-1] for tag in ("lm loss", "prompt nll", "response nll", "prompt tokens",
                                                           "response tokens", "response nll validation")}
        assert scalar["lm loss"].step == 2
        for column, tag in (("train_lm_loss", "lm loss"), ("train_prompt_nll", "prompt nll"),
                            ("train_response_nll", "response nll"), ("valid_response_nll", "response nll validation")):
            assert row[column] == pytest.approx(scalar[tag].value, rel=1e-6), (name, column)
        tokens = sum(e.value for tag in ("prompt tokens", "response tokens") for e in events.Scalars(tag))
        assert row["tokens_seen"] == tokens > 0
        first[name] = (events.Scalars("prompt nll")[0], events.Scalars("response nll")[0])
    # The plain NLLs at iteration 1 (the same start, data and batch) do not depend on λ; the runs then differ.
    assert all(p.step == r.step == 1 for p, r in first.values())
    assert len({(p.value, r.value) for p, r in first.values()}) == 1
    assert len({r["train_lm_loss"] for r in rows.values()}) == len({r["valid_response_nll"] for r in rows.values()}) == 3
    out = capsys.readouterr().out
    assert f"{FAILING}: failed: exit status" in out and all(name in out for name in rows)


def lm_eval_result(directory: Path, acc: float) -> None:
    """A result file in lm-evaluation-harness 0.4's layout."""
    path = directory / "lm-eval" / "__hf" / "results_2026-12-07T00-00-00.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": acc, "acc_stderr,none": 0.01, "acc_norm,none": acc - 0.05},
                    "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": acc / 2, "exact_match_stderr,strict-match": "N/A"}},
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True}},
        "versions": {"arc_easy": 1.0, "gsm8k": 3.0}, "n-shot": {"arc_easy": 0, "gsm8k": 5},
        "config": {"model": "hf", "model_args": f"pretrained={directory / 'hf'}"}, "date": 1.7e9}))


def red_pixels(png: Path) -> np.ndarray:
    from matplotlib.image import imread

    image = imread(str(png))[..., :3]
    return np.argwhere((image[..., 0] > 0.95) & (image[..., 1] < 0.05) & (image[..., 2] < 0.05))  # (y, x)


def test_plot_marks_the_tables_best_cell_and_the_failed_one(sweep):
    from wit_megatron.sweep.collect import collect
    from wit_megatron.sweep.heatmap import draw
    from wit_megatron.sweep.plan import Sweep

    plan = Sweep.read(sweep["dir"])
    accuracy = {"p0.1_r0.5": 0.41, "p0.1_r1": 0.47, "p1_r0.5": 0.44}
    for name, acc in accuracy.items():
        lm_eval_result(sweep["dir"] / "runs" / name, acc)
    table = collect(plan)
    assert {"arc_easy/acc", "arc_easy/acc_stderr", "arc_easy/acc_norm", "gsm8k/exact_match,strict-match"} <= set(table.columns)
    assert table.higher_is_better["arc_easy/acc"] is True and table.higher_is_better["arc_easy/acc_stderr"] is None
    assert [row.get("arc_easy/acc") for row in table.rows] == [0.41, 0.47, 0.44, None]

    for metric, best_of in (("valid_response_nll", min), ("arc_easy/acc", max)):
        assert cli.main(["plot", str(sweep["dir"]), "--metric", metric]) == 0
        heatmap = draw(table, metric, sweep["dir"] / f"check_{metric.replace('/', '_')}")
        finished = {(r["lambda_prompt"], r["lambda_response"]): r[metric] for r in table.rows if r["status"] == "finished"}
        assert heatmap.best == best_of(finished, key=finished.get)
        red = red_pixels(heatmap.png)
        assert len(red) > 100
        for point, (shown, (x0, y0, x1, y1)) in heatmap.cells.items():
            inside = ((red[:, 1] >= x0 - 2) & (red[:, 1] <= x1 + 2) & (red[:, 0] >= y0 - 2) & (red[:, 0] <= y1 + 2)).sum()
            assert (inside == len(red)) == (point == heatmap.best), (metric, point)  # every red pixel frames the best cell
            assert shown == ("failed" if point == (1, 1) else "value")
        svg = heatmap.svg.read_text()
        assert 'id="best-cell"' in svg and "failed" in svg
        assert (sweep["dir"] / f"heatmap_{metric.replace('/', '_')}.png").is_file()


def test_export_converts_each_finished_run_for_lm_eval(sweep, capsys):
    import transformers

    assert cli.main(["export", str(sweep["dir"])]) == 0
    out = capsys.readouterr().out
    assert f"{FAILING}: not exported: failed" in out
    readme = (sweep["dir"] / "README.md").read_text()
    for name in ("p0.1_r0.5", "p0.1_r1", "p1_r0.5"):
        hf = sweep["dir"] / "runs" / name / "hf"
        assert f"{name}: exported" in out and f"pretrained={hf} " in out and f"pretrained={hf} " in readme
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf))
        assert model.config.num_hidden_layers == 2 and tokenizer.chat_template
    assert cli.main(["collect", str(sweep["dir"])]) == 0
    rows = json.loads((sweep["dir"] / "results.json").read_text())["runs"]
    assert [bool(row["hf"]) for row in rows] == [True, True, True, False]


def log_line(iteration: int, of: int, loss: float, prompt: int, response: int) -> str:
    """A training log line as wit_megatron.training.log prints it (the fields collect reads)."""
    return (f" iteration {iteration:8d}/{of:8d} | consumed samples: {2 * iteration:12d} | elapsed time per iteration (ms): 9.0 |"
            f" learning rate: 1.000000E-03 | global batch size:     2 | lm loss: {loss:.6E} | prompt nll: {loss + 1:.6E} |"
            f" response nll: {loss:.6E} | loss scale: 1.0 | tokens per second: 10.0 | number of skipped iterations:   0 |"
            f" number of nan iterations:   0 | prompt tokens: {prompt} | response tokens: {response} | N: {prompt + response} |")


def test_status_follows_a_run_across_kills_stops_and_resumes(tmp_path):
    """Every state a run can be in, from its train.log: a resume from an earlier save replaces the
    iterations after it, a killed attempt is failed with what killed it, one that has not ended is
    running, a clean stop is stopped; collect keeps every run, whatever its state."""
    from wit_megatron.sweep.collect import collect
    from wit_megatron.sweep.plan import PlanConfig, plan

    sweep = plan(PlanConfig(out=tmp_path / "s", lambda_prompt=[0, 1], lambda_response=[0.5, 1], nproc_per_node=1,
                            train_args=["--data-path", "DATA", "--train-iters", "4"], check=False))
    runs = {run.name: tmp_path / "s" / "runs" / run.name for run in sweep.runs}
    started = "=== attempt started 2026-12-07T00:00:00Z on node1: --load /base\n"
    killed = ("".join(log_line(i, 4, 5.0 - i, 10, 20) + "\n" for i in (1, 2, 3)) + "saved /ckpt/iter_0000002\n"
              "[W] Signal 9 (SIGKILL) received by PID 123\n=== attempt ended 2026-12-07T00:01:00Z: exit status -9\n")
    resumed = "loaded /ckpt: resuming after iteration 2, 4 samples consumed\n" + log_line(3, 4, 1.5, 7, 9) + "\n"
    logs = {
        "p0_r0.5": started + killed + started + resumed + log_line(4, 4, 1.25, 5, 6) + "\n"
                   "=== attempt ended 2026-12-07T00:02:00Z: exit status 0\n",
        "p0_r1": started + killed + started + resumed,
        "p1_r0.5": started + log_line(1, 4, 4.0, 10, 20) + "\nstopping after iteration 1: exit-interval\n"
                   "=== attempt ended 2026-12-07T00:01:00Z: exit status 0\n",
    }  # p1_r1: not started
    for name, text in logs.items():
        (runs[name] / "train.log").write_text(text)
    (runs["p1_r0.5"] / "checkpoints").mkdir()
    (runs["p1_r0.5"] / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1\n")
    rows = {row["run"]: row for row in collect(sweep).rows}
    assert [row["status"] for row in rows.values()] == ["finished", "running", "stopped", "not started"]
    finished = rows["p0_r0.5"]
    assert finished["iteration"] == 4 and finished["attempts"] == 2 and finished["train_lm_loss"] == 1.25
    assert finished["tokens_seen"] == 2 * (10 + 20) + (7 + 9) + (5 + 6)  # iteration 3 of the resumed attempt, not the killed one
    assert rows["p0_r1"]["detail"].startswith("iteration 3 of 4; no exit recorded")
    assert rows["p1_r0.5"]["detail"] == "after iteration 1 of 4 (exit-interval, exit status 0); run.sh resumes it from iteration 1"
    (runs["p0_r1"] / "train.log").write_text(started + killed)
    assert collect(sweep).rows[1]["status"] == "failed"
    assert collect(sweep).rows[1]["detail"] == "exit status -9: Signal 9 (SIGKILL) received by PID 123"


def test_the_sweep_started_again_runs_only_what_did_not_finish(sweep):
    """sweep.sh again, with the failed run's cause removed: the finished runs are not run again, the
    failed one runs from the start (it had no save) and its history replaces the failed attempt's."""
    (sweep["dir"] / "runs" / FAILING / "checkpoints").unlink()
    again = subprocess.run(["bash", str(sweep["dir"] / "sweep.sh")], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                           env=UNRELATED_ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": finished; not run again") == 3
    assert cli.main(["collect", str(sweep["dir"])]) == 0
    rows = {row["run"]: row for row in json.loads((sweep["dir"] / "results.json").read_text())["runs"]}
    rerun = rows[FAILING]
    assert rerun["status"] == "finished" and rerun["attempts"] == 2 and rerun["iteration"] == 2 and rerun["saved_iteration"] == 2
    assert [row["attempts"] for name, row in rows.items() if name != FAILING] == [1, 1, 1]
    assert rerun["tokens_seen"] == rows["p0.1_r0.5"]["tokens_seen"]  # the same data, counted once
