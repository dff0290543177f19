#!/usr/bin/env bash
# Build, on a machine that reaches PyPI, the Transformer Engine (TE) bundle that install.sh installs on an offline
# H100/H200 (sm_90) with Python 3.12 and a CUDA-13 torch. Called by tools/fetch_gpu_wheels.sh --te.
#   bash tools/te_offline/pack.sh DEST [TE_VERSION] [MCORE_VERSION]     (defaults: 2.11.0, 0.16.1)
# megatron-core 0.16.1 declares TE >= 2.9, < 2.12. TE's CUDA-13 core wheel is ~180-280 MB for 9 GPU architectures;
# keeping only sm_90's code of libtransformer_engine.so (fatbin_prune.py: entries compacted in place, offsets
# unchanged, the freed bytes zeros), stripped and xz-compressed, it is ~20 MB. TE's torch extension is source-only
# on PyPI (C++ only, no nvcc): install.sh builds it on the GPU machine (~3 min on 16 cores, estimated).
set -euo pipefail
DEST=${1:?usage: pack.sh DEST [TE_VERSION] [MCORE_VERSION]}; TE=${2:-2.11.0}; MC=${3:-0.16.1}
HERE=$(cd "$(dirname "$0")" && pwd)
py312() { if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then python3.12 "$@";
          else PYENV_VERSION=$(pyenv versions --bare | grep '^3\.12' | head -1) pyenv exec python3.12 "$@"; fi; }
C=${CACHE:-$HOME/.cache/te-offline}; mkdir -p "$C" "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$C" \
  "transformer-engine-cu13==$TE" "transformer-engine==$TE" einops
X=$(mktemp -d); trap 'rm -rf "$X"' EXIT
# the torch extension is an sdist whose metadata step fails without a CUDA toolchain; pip unpacks it first, and
# --no-clean keeps that copy
mkdir -p "$X/pipdl"; TMPDIR="$X/pipdl" python3 -m pip download -q --no-clean --no-deps --no-binary :all: \
  --no-build-isolation -d "$X/sdl" "transformer-engine-torch==$TE" >/dev/null 2>&1 || true
SETUP=$(find "$X/pipdl" -maxdepth 3 -name setup.py | head -1)
[ -n "$SETUP" ] || { echo "pack.sh: no transformer-engine-torch==$TE sources from PyPI" >&2; exit 1; }
unzip -q "$C"/transformer_engine_cu13-"$TE"-*.whl -d "$X"
LIB=$(find "$X" -name libtransformer_engine.so | head -1)
python3 "$HERE/fatbin_prune.py" "$LIB" "$X/libte_sm90.so" 90
strip --strip-unneeded "$X/libte_sm90.so"
xz -9 -T0 -c "$X/libte_sm90.so" > "$DEST/libte_sm90_stripped.so.xz"
S=$X/stage/te_site; mkdir -p "$S"; cp -r "$X/transformer_engine" "$S/"
rm -rf "$S/transformer_engine/jax" "$S/transformer_engine/wheel_lib/nccl_ep" "$S"/transformer_engine/wheel_lib/*.so
cp -r "$X"/transformer_engine_cu13-"$TE".dist-info "$S/"
unzip -q "$C"/transformer_engine-"$TE"-py3-none-any.whl "transformer_engine-$TE.dist-info/*" -d "$S"
cp -r "$(dirname "$SETUP")" "$X/stage/te_torch_src"
find "$X/stage" -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$X/stage" te_site te_torch_src | xz -9 > "$DEST/te_py_and_src.tar.xz"
INC=$(py312 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')  # Python.h, in case the GPU image lacks it
tar cf - -C "$(dirname "$INC")" "$(basename "$INC")" | xz -9 > "$DEST/py312_include.tar.xz"
cp "$C"/einops-*.whl "$DEST/"
echo "TE $TE for megatron-core $MC, sm_90" > "$DEST/VERSION"
du -sh "$DEST"
