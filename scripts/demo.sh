#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, export the built-in tiny Mixtral to engines/ (once) and
# generate from it on the CPU, streaming the text and printing the speed. Extra arguments go to
# `mixtrt demo` (e.g. --prompt "..." --max-new-tokens 100 --temperature 0.8 --seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mixtrt demo "$@"
