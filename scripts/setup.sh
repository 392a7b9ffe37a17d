#!/usr/bin/env bash
# Create .venv (if missing) and install mixtrt with its test extras. CPU machines get torch==2.13.0
# (the CPU build); set MIXTRT_TORCH to another requirement (e.g. "torch") on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "${MIXTRT_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
