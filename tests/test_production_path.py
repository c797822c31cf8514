"""What ships and what runs in production stays off the test helpers: the wheel leaves wit_megatron.testing
out, no production module imports it, and the CPU layer is switched on only at process start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_training_entry_point_and_the_tools_import_no_test_helper_and_patch_nothing():
    """Importing every production module (entry point, training, converters, data) leaves
    wit_megatron.testing unimported and the CPU layer off: library code never patches the process."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['pretrain_wit.py', '--help']\n"
        "import wit_megatron.training.loop, wit_megatron.training.arguments, wit_megatron.convert.cli, "
        "wit_megatron.convert.hf_to_mcore, wit_megatron.convert.mcore_to_hf, wit_megatron.convert.verify, "
        "wit_megatron.data.preprocess, wit_megatron.data.loader, wit_megatron.checkpoint\n"
        "from wit_megatron.runtime import cpu\n"
        "import torch\n"
        "print(sorted(m for m in sys.modules if m.startswith('wit_megatron.testing')), cpu.is_active(),"
        " torch.cuda.current_device.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "False", "torch.cuda"], out.stdout


def test_the_wheel_leaves_the_test_helpers_out():
    from setuptools import find_namespace_packages

    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_namespace_packages(str(ROOT), include=config["include"], exclude=config["exclude"])  # pyproject: namespaces on
    assert "wit_megatron" in packages and "wit_megatron.training" in packages and "wit_megatron.convert" in packages
    assert not [p for p in packages if p.startswith("wit_megatron.testing")]
