#!/usr/bin/env bash
# Download, on a machine with internet (PyPI), the wheels the GPU check needs on a lent GPU machine that has
# Python 3.12 and CUDA torch but no megatron-core and no network. They land in tools/wheels/ (git-ignored) and
# travel with the working tree (the device tool's limit is 64 MiB; these are ~20 MB).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d wheels \
    "megatron-core>=0.16.1,<0.20" psutil pydantic pyyaml safetensors sentencepiece webdataset tqdm
du -sh wheels
