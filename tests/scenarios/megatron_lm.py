"""Rank side of tests/test_megatron_lm_pretrain.py: Megatron-LM's own pretrain() runs
examples/megatron_lm/pretrain_gpt_wit.py, launch after launch, and then examples/pretrain_wit.py's loop.

Each Megatron-LM launch is the example's `main()` with its command line in `sys.argv`, one after the
other in these ranks as Megatron-LM's in-process restart runs pretrain() again
(`training.destroy_global_state()` between): one import of Megatron-LM for all launches.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/megatron_lm/pretrain_gpt_wit.py"


def runs(megatron_lm: list[list[str]], pretrain_wit: list[str], save: str) -> dict:
    """`megatron_lm`: the example's command lines, run in order; `pretrain_wit`: pretrain_wit.py's options.
    Returns each launch's exit status and the tracker file of `save` after it, and pretrain_wit's run."""
    from megatron.training import global_vars, training

    from tests.scenarios.training import runs as pretrain_wit_runs

    spec = importlib.util.spec_from_file_location("pretrain_gpt_wit", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    launches = []
    for argv in megatron_lm:
        sys.argv = [str(EXAMPLE), *argv]
        try:
            status = example.main()
        except SystemExit as stop:  # pretrain() exits the process after an --exit-interval stop
            status = stop.code
        writer = global_vars.get_tensorboard_writer()
        if writer is not None:
            writer.close()  # its events on disk now, not when the process ends
        training.destroy_global_state()
        tracker = Path(save) / "latest_checkpointed_iteration.txt"
        launches.append({"status": status, "tracker": tracker.read_text().strip() if tracker.exists() else None})
    (wit,) = pretrain_wit_runs([{"argv": pretrain_wit}])
    return {"launches": launches, "pretrain_wit": wit}
