#!/usr/bin/env bash
# Device check on one H100/H200, no network, under 8 minutes. Run from the repository root:
#   bash tools/gpu_check.sh [OUT_DIR]        (the device tool sets $OUT; results land there)
# 1. installs megatron-core & co from tools/wheels (see tools/fetch_gpu_wheels.sh) if the image lacks them;
# 2. correctness on CUDA: packed thd attention == per-document (SDPA core attention), bf16 VLM steps (NCCL);
# 3. Transformer Engine layer spec with bf16 and FP8, only if transformer_engine imports (it usually cannot be
#    installed on the lent machines: then it says so, and FP8 stays unverified);
# 4. ViQ encode throughput, packed vs one-by-one, on CUDA;
# 5. our training step vs HF transformers' on CUDA (bench train, fp32, its three configs);
# 6. the speed-up benchmark at the real shapes (SigLIP2-g encoder vs Qwen2.5-0.5B/1.5B, 4K and 16K) with MFU
#    against the dense bf16 peak.
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

python -c "import megatron.core, transformers, pytest, PIL, google.protobuf, pydantic, yaml, safetensors, webdataset" \
    2>/dev/null \
  || pip install --no-index --find-links tools/wheels megatron-core transformers pytest pillow psutil pydantic pyyaml \
       safetensors sentencepiece protobuf webdataset tqdm >> "$OUT/gpu_check.log" 2>&1 \
  || log "offline install from tools/wheels failed (run tools/fetch_gpu_wheels.sh first; see the log above)"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/gpu_check.log"

log "packed thd attention and the discrete VLM on CUDA"
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/test_vlm.py -k "packed_row" 2>&1 | tail -5 \
  | tee -a "$OUT/gpu_check.log"

if python -c "import transformer_engine.pytorch" 2>/dev/null; then
  log "Transformer Engine present: bf16 and FP8 steps of the tiny text recipe with the TE layer spec"
  for precision in bf16 fp8; do
    timeout 120 python -m viq_mllm train recipes/tiny_text_cpu.yaml run.dir="$OUT/te_$precision" train.steps=4 \
      train.warmup_steps=1 parallel.transformer_impl=transformer_engine train.precision=$precision \
      log.wandb=disabled log.tensorboard=false log.progress=false 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
  done
else
  log "transformer_engine does not import here: TE layer spec and FP8 are NOT verified on this machine"
fi

log "ViQ encode on CUDA, packed vs one image at a time (issue 3's goal: packed >= 2x)"
timeout 150 python -m viq_mllm bench encode --archs tiny so400m --sizes 256 512 --images 32 --out "$OUT/encode" 2>&1 \
  | grep -v Warning | tail -8 | tee -a "$OUT/gpu_check.log"

log "training step, ours vs HF LlamaForCausalLM on CUDA (issue 2's goal: ours >= HF)"
timeout 120 python -m viq_mllm bench train --rounds 20 --out "$OUT/train" 2>&1 | grep -v Warning | tail -16 \
  | tee -a "$OUT/gpu_check.log"

log "speed-up benchmark, real shapes"
timeout 300 python -m viq_mllm bench speedup --preset gpu --rounds 2 --out "$OUT/speedup" 2>&1 \
  | grep -v Warning | tail -30 | tee -a "$OUT/gpu_check.log"  # the table survives a plot failing without matplotlib
log "done"
