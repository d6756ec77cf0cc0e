#!/usr/bin/env bash
# Set up pudm from nothing: a virtual environment in .venv with the pinned dependencies
# (requirements/constraints.txt) and pudm itself, editable, with the test tools and the Stable
# Diffusion, data-format (Parquet, Arrow), TensorBoard and documentation extras.
# Safe to run again: an existing .venv is reused and only brought up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[test,sd,data,tensorboard,docs]"
