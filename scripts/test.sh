#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, run ruff, the type checker (mypy on the whole package, from
# the checkout) and the default test suite (CPU, not slow, not gpu).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
