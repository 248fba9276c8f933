#!/usr/bin/env bash
# One-GPU check of the scale path: 30 steps of a ~1.3B student (let_1b4's shape) with a
# 135M-class teacher (SmolLM2-135M's shape), bf16 vs float8, compile on. Prints tokens/s,
# MFU and peak memory per arm and writes benchmarks/results/gpu_check.json.
#   bash benchmarks/gpu_check.sh            # from the repo root, letrecipes installed
# Needs no download: the data is the demo corpus; the teacher is a randomly initialised
# model of SmolLM2-135M's shape (the cost of a teacher does not depend on its weights).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" benchmarks/gpu_check.py "$@"
