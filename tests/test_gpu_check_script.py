"""tests/gpu/check_wit_gpu.py cannot run here; what it decides on its own can. (Its --cpu-dry-run
runs all of its non-TE checks on CPU in about 3 minutes: run by hand, not in CI.)"""

from __future__ import annotations

import sys

import pytest

from tests.gpu import check_wit_gpu as script


@pytest.fixture
def broken_transformer_engine(tmp_path, monkeypatch):
    """A transformer_engine package whose import fails the way a build against another CUDA fails."""
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text('raise OSError("libtransformer_engine.so: undefined symbol: cudnnGetVersion")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(script, "FAILURES", [])


def test_a_broken_transformer_engine_is_a_failure_where_cuda_is(broken_transformer_engine, capsys):
    """With CUDA present, a TE that fails to import is a FAIL showing its error (the script then exits 1),
    not "TE not available" followed by "all checks passed" (which the script printed before: checked
    with that version of the function, this test fails)."""
    assert script.transformer_engine_checks(cuda=True) is False
    assert script.FAILURES == ["Transformer Engine imports"]
    assert "FAIL  Transformer Engine imports: OSError: libtransformer_engine.so: undefined symbol: cudnnGetVersion" in capsys.readouterr().out


def test_without_cuda_transformer_engine_is_not_tried(broken_transformer_engine, capsys):
    assert script.transformer_engine_checks(cuda=False) is False
    assert script.FAILURES == [] and "NOTE  no GPU: Transformer Engine checks are not run" in capsys.readouterr().out
