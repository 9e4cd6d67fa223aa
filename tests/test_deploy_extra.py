"""Without the deploy extra: one sentence that says how to install it (runs whether or not it is installed)."""

from __future__ import annotations

import sys

import pytest

from ldnbench import deploy
from ldnbench.cli import main
from ldnbench.errors import UserError


def test_missing_extra_is_one_sentence(tmp_path, cli_runner, monkeypatch):
    ck = tmp_path / "missing.pt"  # never read: the backend is refused first
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # how Python marks a module as unimportable
    with pytest.raises(UserError, match=r"pip install 'ldnbench\[deploy\]'"):
        deploy.require("onnxruntime")
    # refused before the dataset or the checkpoint is even looked at
    for args in (["eval", "--checkpoint", str(ck), "--model", "ldn121", "--dataset", "cityscapes", "--root",
                  str(tmp_path / "nowhere"), "--backend", "onnxruntime", "--quiet"],
                 ["onnx", "--checkpoint", str(ck), "--out", str(tmp_path / "m.onnx")],
                 ["bench", "speed", "--size", "32", "--backend", "torch,onnxruntime"]):
        r = cli_runner.invoke(main, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "onnxruntime" in r.output, r.output
        assert "ldnbench[deploy]" in r.output
