#!/usr/bin/env bash
# Download, on a machine with internet (PyPI), the wheels the GPU check needs on a lent GPU machine that has
# Python 3.12 and CUDA torch but no megatron-core and no network. They land in tools/wheels/ (git-ignored) and
# travel with the working tree (the device tool's limit is 64 MiB; these are ~56 MB).
# megatron-core and transformers come without their dependencies: both would pull a CUDA torch (~3 GB) that the
# GPU machine already has; everything else comes with its (torch-free) dependencies. Versions: the ones the CPU
# suite runs (megatron-core 0.16.1, transformers 5.24.0).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
target=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 -d wheels)
pip download "${target[@]}" --no-deps "megatron-core==0.16.1" "transformers==5.24.0"
pip download "${target[@]}" numpy packaging psutil pydantic pyyaml safetensors sentencepiece webdataset tqdm \
    huggingface-hub tokenizers regex typer pytest pillow protobuf
if ls wheels | grep -E '^(torch|nvidia_|triton)'; then
  echo "a dependency pulled torch or CUDA libraries into tools/wheels: remove them" >&2
  exit 1
fi
du -sh wheels
