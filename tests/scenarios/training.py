"""Rank side of the training-run tests: `pretrain` runs as the entry point runs it, several runs per launch.

`runs(jobs)`: each job is {"argv": [...pretrain_wit.py options...], "sigterm_after": k or None,
"params": bool, "logits_of": tokens or None}: the options are parsed at this launch's world size and the
run trained; with "sigterm_after" rank 0 sends itself SIGTERM during iteration k (as a scheduler would,
mid-step). Returns per job what the tests compare: the log lines' values, the stop, (with "params")
this rank's trained parameters, (with "logits_of") the trained model's logits on those tokens.
"""

from __future__ import annotations

import gc
import os
import signal

import torch

from wit_megatron.model import unwrap
from wit_megatron.training import loop
from wit_megatron.training.arguments import parse_args


def runs(jobs: list[dict]) -> list[dict]:
    from megatron.core import parallel_state as ps

    from wit_megatron.convert.verify import model_logits

    results = []
    real_step = loop.train_step
    for job in jobs:
        calls = 0

        def step(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == job.get("sigterm_after") and torch.distributed.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the step, as a scheduler's would
            return real_step(*args, **kwargs)

        loop.train_step = step
        try:
            args = parse_args(job["argv"])
            result = loop.pretrain(args)
        finally:
            loop.train_step = real_step
        params = {f"{i}.{name}": p.detach().clone() for i, chunk in enumerate(result.model)
                  for name, p in unwrap(chunk).named_parameters()} if job.get("params") else None
        logits = model_logits(result.model, args.arch, job["logits_of"]) if job.get("logits_of") is not None else None
        results.append({
            "train_log": result.train_log, "valid_log": result.valid_log, "exit_reason": result.exit_reason,
            "exit_code": result.exit_code, "iteration": result.iteration, "consumed": result.consumed_train_samples,
            "params": params, "logits": logits,
            "last_stage": ps.is_pipeline_last_stage(ignore_virtual=True),
        })
        # The run's model and optimizer sit in reference cycles: free them now, not when the collector next
        # runs, so that the next job does not start with this one's memory.
        del result, params, logits
        gc.collect()
    return results
