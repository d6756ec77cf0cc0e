#!/usr/bin/env bash
# Check the version floors of pyproject.toml for real: install the lowest version of every direct
# dependency that pyproject.toml allows (uv's --resolution lowest-direct; indirect dependencies
# resolve as a user's install would) into a throwaway virtual environment, and run the fast tests
# there. A floor the code does not work with fails here, not after a user's training run.
#
#   bash scripts/check_floors.sh            # keeps nothing
#   FLOORS_DIR=/tmp/floors bash scripts/check_floors.sh -k objectives   # reuse a folder; pytest args
#
# Needs network access to PyPI (torch's lowest allowed release is a multi-GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WORK="${FLOORS_DIR:-}"
if [ -z "$WORK" ]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
if [ ! -x "$WORK/tools/bin/uv" ]; then
    "$PYTHON" -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install --quiet --disable-pip-version-check uv
fi
UV="$WORK/tools/bin/uv"
"$UV" venv --quiet --allow-existing --python "$PYTHON" "$WORK/venv"
"$UV" pip install --quiet --python "$WORK/venv/bin/python" --resolution lowest-direct -e ".[test,sd,data]"
echo "lowest direct versions:" >&2
"$UV" pip freeze --python "$WORK/venv/bin/python" \
    | grep -iE '^(torch|torchvision|diffusers|accelerate|safetensors|numpy|pillow|scikit-learn|tqdm|torchmetrics|scipy|matplotlib|transformers|peft|huggingface-hub|pytest)==' >&2
# The fast tests: everything but the multi-process launches, which test accelerate's launcher
# rather than a floor, and the documentation site, whose tools (the docs extra) are not the
# library's dependencies.
"$WORK/venv/bin/python" -m pytest -q -x -p no:cacheprovider --ignore=tests/test_distributed.py \
    --ignore=tests/test_docs.py "$@"
