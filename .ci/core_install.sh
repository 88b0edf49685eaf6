#!/usr/bin/env bash
# The lean core (issue 27): a fresh virtual environment with `pip install .` and no extras runs
# .ci/core_check.py (the method without peft; one-line install hints for the commands of extras).
# TORCH: the torch requirement, as in the Makefile (this project's machines install it from a local file).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/sharelora-core.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "${TORCH:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q .
cd "$venv"  # not the checkout: the installed package, not ./src, is what is tested
OMP_NUM_THREADS=1 "$venv/bin/python" "$OLDPWD/.ci/core_check.py"
