"""Converted checkpoints load through Megatron-LM's own `load_checkpoint` (`pretrain_gpt.py`'s arguments
parsing, `initialize_megatron`, `get_model`, `--load CKPT --finetune --ckpt-format torch_dist`) with the
architecture flags the converter writes to `megatron_lm_flags.txt`, and give transformers' logits.

Megatron-LM's `megatron.training` ships in megatron-core's wheel from 0.17 on: this file runs on
.ci/run's Python 3.12 / megatron-core 0.19.2 leg. megatron-core 0.16.1's wheel (the 3.11 leg) has no
`megatron.training`, so there the tests are skipped with that reason; docs/convert.md records the
manual 0.16.1 run against Megatron-LM's source tree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.convert_models import build
from wit_megatron.megatron_lm_args import FLAGS_FILE

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                                reason="this megatron-core wheel has no megatron.training (0.16.1): runs on the 0.19.2 leg")


def megatron_lm_load(hf: Path, ckpt: Path, *flags: str) -> tuple[float, float]:
    """(max |Δlogit|, top-1 agreement) of Megatron-LM's loaded model against transformers'."""
    run = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools/convert_check_megatron_lm.py"), "installed",
                          str(hf), str(ckpt), *flags, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
                         capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"Megatron-LM load_checkpoint: iteration 0, padded vocab 100, max \|logit - HF logit\| (\S+), "
                      r"top-1 agreement (\S+)", run.stdout)
    assert found, (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    return float(found.group(1)), float(found.group(2))


def convert(hf: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# q/k norms with a head dim of its own; llama3 RoPE scaling; biases on every linear layer with MQA; QKV bias, tied.
@pytest.mark.parametrize("case", ["qwen3_qk_norm", "llama3_rope_scaling", "llama_mqa_biases", "qwen2_qkv_bias_tied"])
def test_megatron_lm_loads_with_the_written_flags(tmp_path, case):
    """With the Qwen2 case, Megatron-LM also saves what it loaded (its own save_checkpoint): that save
    passes this project's checks of untrusted checkpoints, i.e. everything Megatron-LM pickles is in
    wit_megatron/safe_pickle.py's admission list (its args, RNG and rerun state)."""
    from wit_megatron.checkpoint import check_files, resolve

    hf = build(case, tmp_path / "hf")
    ckpt = convert(hf, tmp_path / "megatron")
    flags = (ckpt / FLAGS_FILE).read_text().split()
    save = ["--save", str(tmp_path / "mlm"), "--save-interval", "1", "--no-save-optim"] if case == "qwen2_qkv_bias_tied" else []
    diff, top1 = megatron_lm_load(hf, ckpt, *flags, *save)
    assert diff <= 1e-4 and top1 == 1.0
    if save:
        root, directory = resolve(tmp_path / "mlm")
        assert directory == tmp_path / "mlm/iter_0000001" and (directory / ".metadata").is_file()
        check_files(directory)


def test_use_checkpoint_args_alone_drops_the_qk_norms(tmp_path):
    """Why the flags file exists: Megatron-LM's --use-checkpoint-args restores no q/k norm, RoPE scaling
    or norm epsilon (not in its load_args_from_checkpoint list), although the stored args hold them:
    a Qwen3 model then loads without its q/k norms, and its logits are far off."""
    hf = build("qwen3_qk_norm", tmp_path / "hf")
    ckpt = convert(hf, tmp_path / "megatron")
    diff, _ = megatron_lm_load(hf, ckpt, "--use-checkpoint-args")
    assert diff > 0.1
