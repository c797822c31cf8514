"""λ sweeps: the WIT paper's experiment, a grid of (λ_p, λ_r) fine-tuned from one model on one data set.

    wit-sweep plan --lambda-prompt 0,0.2,...,1 --lambda-response 0,0.2,...,1 --skip 0,0 --out DIR -- ARGS
    bash DIR/sweep.sh            (one run after another here)   or   sbatch DIR/sweep.sbatch (a Slurm array)
    wit-sweep collect DIR        (DIR/results.csv, DIR/results.json)
    wit-sweep plot DIR --metric valid_response_nll
    wit-sweep export DIR         (every finished run's last save -> RUN/hf; DIR/README.md has the lm_eval commands)

plan.py writes the runs and their scripts (scripts.py), status.py reads one run's log, lm_eval.py the
lm-evaluation-harness results in its directory, collect.py makes the table of all runs, heatmap.py
draws it, export.py hands finished runs to evaluation; cli.py is the command line.
"""
