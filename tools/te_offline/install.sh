#!/usr/bin/env bash
# On the GPU machine (no network): install the bundle pack.sh made into SITE and build TE's torch extension there,
# or reuse one built by an earlier run (BUNDLE/transformer_engine_torch.so.xz; this script writes it to OUT after
# a build, so carrying it along spares the next run the ~3 minutes).
#   bash tools/te_offline/install.sh BUNDLE SITE OUT        then: PYTHONPATH=SITE python -c "import transformer_engine.pytorch"
set -uo pipefail
P=${1:?bundle}; SITE=${2:?site}; OUT=${3:?out}; PY=${PYTHON:-python3}; W=$(mktemp -d)
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$SITE" "$OUT"
unxz() { $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 24)" "$@"; }
untar() { $PY -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])" "$@"; }
[ -d "$SITE/transformer_engine" ] || { untar "$P/te_py_and_src.tar.xz" "$W" && cp -r "$W/te_site/." "$SITE/"; }
LIB=$SITE/transformer_engine/wheel_lib/libtransformer_engine.so
[ -f "$LIB" ] || unxz "$P/libte_sm90_stripped.so.xz" "$LIB"
$PY -m pip install -q --no-index --no-deps --target "$SITE" "$P"/einops-*.whl
EXT=$(ls "$SITE"/transformer_engine_torch*.so 2>/dev/null | head -1)
TAG=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -z "$EXT" ] && [ -f "$P/transformer_engine_torch.so.xz" ]; then
  unxz "$P/transformer_engine_torch.so.xz" "$SITE/transformer_engine_torch$TAG"; EXT=reused
fi
if [ -z "$EXT" ]; then
  [ -d "$W/te_torch_src" ] || untar "$P/te_py_and_src.tar.xz" "$W"
  untar "$P/py312_include.tar.xz" "$W/pyinc"
  NVTE_PROJECT_BUILDING=1 MAX_JOBS=${MAX_JOBS:-16} timeout "${TE_BUILD_TIMEOUT_S:-420}" \
    $PY "$HERE/te_build_ext.py" "$W/te_torch_src" "$W/build" "$W/pyinc/python3.12" > "$OUT/te_build.log" 2>&1
  echo "TE extension build: exit $? (log: $OUT/te_build.log)"; tail -3 "$OUT/te_build.log"
  cp "$W"/build/transformer_engine_torch*.so "$SITE/" && \
    $PY -c "import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[2], 'wb', preset=6))" \
      "$(ls "$W"/build/transformer_engine_torch*.so | head -1)" "$OUT/transformer_engine_torch.so.xz"
fi
rm -rf "$W"
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" $PY -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__version__ if hasattr(te, '__version__') else '', 'imports')"
