"""Every op folder has the same files, and each op module imports alone (no import circles)."""

import subprocess
import sys
from pathlib import Path

import pytest

from mixtrt.plugins import OPS

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
FILES = {"__init__.py", "SPEC.md", "torch_op.py", "onnx_op.py"}


@pytest.mark.parametrize("op_type", sorted(OPS))
def test_op_folder_has_the_shared_files(op_type):
    folder = PLUGINS / OPS[op_type].rsplit(".", 1)[1]
    assert FILES <= {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("module", [f"{pkg}.{part}" for pkg in OPS.values() for part in ("onnx_op", "torch_op")]
                         + ["mixtrt.plugins.onnx_common"])
def test_each_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
