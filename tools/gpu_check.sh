#!/usr/bin/env bash
# Device check on one GPU, no network needed, inside one time budget. Run from the repository root:
#   bash tools/gpu_check.sh [OUT_DIR]          (default $OUT, else runs/gpu_check; results land there)
#   GPU_CHECK_BUDGET_S=500 (default): the whole script ends within this many seconds. Steps run in order of what they settle;
#   each gets the time it may need or what is left, and a step that no longer fits is skipped (logged). Every
#   result is written to OUT as soon as it exists: gpu_check.log, steps.log and at most 6 JSON / PNG files.
#   GPU_CHECK_STEPS="2 4" runs only those of steps 1-6 (a second call after a fix); step 7 runs only when named.
# Prefer nvidia-h200: by estimate (docs/decisions.md) the Qwen2.5-1.5B cells of the speed-up need more than an
# H100's 80 GB (they would be reported as "not measured: out of memory", and the run goes on). On an H200 every
# step ran in two calls of ~300 s each (docs/benchmarks.md has the results).
#
# 0. megatron-core, pydantic, webdataset and the teacher from tools/wheels (tools/fetch_gpu_wheels.sh; carry
#    tools/wheels), installed with --no-deps into /tmp/site where the image lacks them;
# 1. ViQ encode on CUDA, packed vs one image at a time (the goal: packed >= 2x);
# 2. correctness on CUDA: the flash varlen kernel of packed rows == per-document attention (outputs and
#    gradients), packed VLM rows == documents alone, bf16 runs checkpoint, resume exactly and follow fp32; and
#    every optional patch of megatron_ext/patches (opted in with VIQ_MLLM_GPU_PATCHES=all) against the path it
#    replaces;
# 3. the speed-up at the real shapes (SigLIP2-g-sized encoder vs Qwen2.5-0.5B/1.5B), 4K, encoder trained;
# 4. our training step vs HF transformers' on CUDA (bench train, fp32, three configs: the goal ours >= HF), with
#    megatron's own path (the GPU default) and with every patch opted in;
# 5. the speed-up at 4K and 16K with the encoder forward-only (trained, its activations at 16K alone exceed one
#    GPU);
# 6. Transformer Engine layer spec: 50 steps of the tiny text recipe, then of the 0.5B-shaped discrete VLM at 4K
#    (random weights, synthetic codes), each in bf16, FP8 with delayed scaling and FP8 with current (tensorwise)
#    scaling; the FP8 losses compared with bf16's, step times and an MFU lower bound
#    (tools/te_offline/compare_losses.py). TE comes
#    from tools/wheels/te (tools/fetch_gpu_wheels.sh --te; installed, and its torch extension built, ~3 min, into
#    /tmp/site); without it the step says so and FP8 stays unverified.
# 7. (GPU_CHECK_STEPS=7) step 3 with logits at the caption tokens only, as training computes them
#    (--supervised-logits), for the training-time speed-up beside step 3's paper setting.
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-500}))
log() { echo "[gpu_check $(date +%H:%M:%S) ${SECONDS}s] $*" | tee -a "$OUT/gpu_check.log"; }

# step MAX_S MIN_S LINES TITLE -- COMMAND...: COMMAND under `timeout min(MAX_S, time left)`, skipped when less
# than MIN_S is left; the last LINES lines of its output go to the log, all of it to steps.log.
step() {
  local max=$1 min=$2 lines=$3 title=$4
  shift 5
  [[ " ${GPU_CHECK_STEPS:-1 2 3 4 5 6} " == *" ${title%%.*} "* ]] || return 0
  local left=$((deadline - SECONDS))
  if ((left < min)); then
    log "SKIPPED (${left}s left, needs ${min}s): $title"
    return
  fi
  log "$title"
  echo "=== $title" >> "$OUT/steps.log"
  timeout $((left < max ? left : max)) "$@" 2>&1 | grep -v Warning | tee -a "$OUT/steps.log" | tail -"$lines" \
    | tee -a "$OUT/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && log "TIMED OUT after $((left < max ? left : max))s: $title"
  ((rc != 0 && rc != 124)) && log "FAILED (exit $rc): $title"
}

if ! $PY -c "import megatron.core, pydantic, webdataset, efficientnet_lite_pytorch" 2>/dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
       tools/wheels/*.whl >> "$OUT/gpu_check.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    log "offline install from tools/wheels failed (run tools/fetch_gpu_wheels.sh here first; see the log above)"
  fi
fi
if [ -d tools/wheels/te ] && ! $PY -c "import transformer_engine.pytorch" 2>/dev/null; then
  log "installing Transformer Engine from tools/wheels/te (its torch extension is built here unless carried)"
  PYTHON=$PY bash tools/te_offline/install.sh tools/wheels/te /tmp/site "$OUT" 2>&1 | tail -4 | tee -a "$OUT/gpu_check.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu_check.log"
$PY -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, '| transformers', \
  transformers.__version__, '| megatron-core', m.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu_check.log"

step 80 30 8 "1. ViQ encode on CUDA, packed vs one image at a time (goal: packed >= 2x)" -- \
  $PY -m viq_mllm bench encode --archs tiny so400m --sizes 256 512 --images 32 --rounds 3 --out "$OUT/encode"
step 150 60 12 "2. packed attention (flash varlen, packed VLM rows), bf16 runs, the opt-in patches on CUDA" -- \
  env VIQ_MLLM_GPU_PATCHES=all $PY -m pytest -q -rs -p no:cacheprovider tests/test_packed_attention.py \
  tests/test_apex_free.py tests/test_one_rank_regions.py tests/test_plain_linear.py tests/test_cross_entropy.py \
  tests/test_vlm.py::test_document_logits_inside_a_packed_row_equal_alone tests/test_bf16.py
step 130 60 12 "3. speed-up, real shapes, 4K, encoder trained" -- \
  $PY -m viq_mllm bench speedup --preset gpu --seq-lengths 4096 --rounds 5 --out "$OUT/speedup_4k"
step 60 30 16 "4. training step, ours (megatron's own path) vs HF LlamaForCausalLM on CUDA (goal: ours >= HF)" -- \
  $PY -m viq_mllm bench train --rounds 12 --out "$OUT/train"
step 60 30 16 "4. training step, ours with every patch opted in vs HF LlamaForCausalLM on CUDA" -- \
  env VIQ_MLLM_GPU_PATCHES=all $PY -m viq_mllm bench train --rounds 12 --out "$OUT/train_patched"
step 200 90 14 "5. speed-up, real shapes, 4K and 16K, encoder forward-only" -- \
  $PY -m viq_mllm bench speedup --preset gpu --seq-lengths 4096 16384 --frozen-encoder --rounds 3 \
  --out "$OUT/speedup_frozen"
step 130 60 12 "7. speed-up, real shapes, 4K, encoder trained, logits at the caption tokens only" -- \
  $PY -m viq_mllm bench speedup --preset gpu --seq-lengths 4096 --rounds 5 --supervised-logits \
  --out "$OUT/speedup_4k_supervised"
# bf16 | fp8:delayed | fp8:tensorwise -> the recipe overrides
precision_args() { echo "train.precision=${1%%:*} train.fp8_recipe=$([[ $1 == *:* ]] && echo "${1#*:}" || echo delayed)"; }
if $PY -c "import transformer_engine.pytorch" 2>/dev/null; then
  for precision in bf16 fp8:delayed fp8:tensorwise; do
    step 100 40 3 "6. Transformer Engine layer spec, 50 steps of the tiny text recipe, $precision" -- \
      $PY -m viq_mllm train recipes/tiny_text_cpu.yaml run.dir="$OUT/te_${precision/:/_}" train.steps=50 \
      parallel.transformer_impl=transformer_engine $(precision_args $precision) \
      log.wandb=disabled log.tensorboard=false log.progress=false
  done
  step 20 5 6 "6. FP8 losses against bf16's, tiny recipe" -- \
    $PY tools/te_offline/compare_losses.py "$OUT/te_bf16" "$OUT/te_fp8_delayed" "$OUT/te_fp8_tensorwise" \
    --out "$OUT/te_losses_tiny.json"
  # the 0.5B-shaped discrete VLM at 4K on one GPU, random weights, synthetic codes of the tiny 2k tokenizer
  syn=/tmp/gpu_check_codes
  [ -d $syn/vocab ] || $PY -c "from pathlib import Path; from viq_mllm.bench.synthetic import make_code_shards; \
    make_code_shards(Path('$syn'), 2000)" >> "$OUT/steps.log" 2>&1
  for precision in bf16 fp8:delayed fp8:tensorwise; do
    step 150 90 3 "6. Transformer Engine, 0.5B-shaped discrete VLM at 4K, 50 steps, $precision" -- \
      $PY -m viq_mllm train recipes/vlm_qwen2.5_0.5b_gpu.yaml run.dir="$OUT/te_vlm_${precision/:/_}" \
      init.checkpoint=null "data.sources=[{path: $syn/shards}]" data.vocab=$syn/vocab model.visual.viq=$syn/viq \
      model.seq_length=4096 data.pack_align=16 parallel.tp=1 parallel.sequence_parallel=false \
      parallel.distributed_optimizer=false train.steps=50 train.warmup_steps=5 train.global_batch_size=8 \
      $(precision_args $precision) checkpoint.every=0 \
      log.wandb=disabled log.tensorboard=false log.progress=false
  done
  step 20 5 6 "6. FP8 losses against bf16's, 0.5B-shaped VLM" -- \
    $PY tools/te_offline/compare_losses.py "$OUT/te_vlm_bf16" "$OUT/te_vlm_fp8_delayed" \
    "$OUT/te_vlm_fp8_tensorwise" --out "$OUT/te_losses_vlm.json"
else
  log "6. transformer_engine does not import here: TE layer spec and FP8 are NOT verified on this machine"
fi
log "done"
