"""`pytest -m gpu` (README's GPU test command) collects the GPU tests without importing the interpreter test modules:
each of those sets TRITON_INTERPRET=1 at import, which would make every Triton kernel of the process run in the
interpreter, so the GPU tests would not test the compiled kernels (tests/conftest.py, pytest_ignore_collect)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import INTERPRETED

ROOT = Path(__file__).resolve().parents[1]


def test_a_gpu_run_keeps_triton_compiled():
    code = ("import os, sys, pytest\n"
            "rc = pytest.main(['-m', 'gpu', '--collect-only', '-q', '-p', 'no:cacheprovider'])\n"
            "print('TRITON_INTERPRET=' + repr(os.environ.get('TRITON_INTERPRET')))\n"
            "sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TRITON_INTERPRET=None" in r.stdout
    collected = {line.split("::")[0] for line in r.stdout.splitlines() if "::" in line}
    assert "tests/gpu/test_triton_cuda.py" in collected
    interpreted = {str(p.relative_to(ROOT)) for p in ROOT.glob("tests/**/test_*.py") if INTERPRETED in p.read_text()}
    assert len(interpreted) >= 5 and not interpreted & collected
