#!/usr/bin/env bash
# The project's prepared GPU check: one H100/H200 (a 2-GPU DDP row where there are two), each step under its own
# timeout, the limits summing to 470 s (520 s with 2+ GPUs) under the 540 s a device call is advised to take.
# Run from the checkout:
#
#   bash benchmarks/gpu_check.sh                 # on the GPU host
#   bash benchmarks/gpu_check.sh --device cpu    # smoke test of every step here (tiny sizes, a few minutes)
#
# The GPU host has no network and no `datasets`: wheels placed in .whl/ (benchmarks/gpu_wheels.sh fetches them)
# are installed into /tmp/site first, and the package runs from the checkout (PYTHONPATH), whatever its pins say.
# Steps: (1) ViT-B/32 bf16 batch 256 throughput, MFU and memory: the trainer as shipped, its step on batches
# already on the device, the lean reference step, the real cache loader; (2) exact accumulation 4 x 64 against one
# batch of 256 (speed; gradient error under bf16 and fp16 against float32); (3) the demo trained through
# `accelerate launch` on the GPU in bf16 and (4) in fp16 with the grad scaler; (5) open_clip's step on the same
# shapes, where open_clip imports; (6) with 2+ GPUs, the demo on 2 GPUs under DDP (NCCL).
# At most 8 files come back from a lent machine: every step's output goes to $OUT/gpu_check.log, the tables to
# $OUT/summary.md, throughput.md, accumulation.md and open_clip.md (5 files).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs cuda or cpu}; fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

LOG="$OUT/gpu_check.log"
: >"$LOG"

# run NAME SECONDS COMMAND...: one step under its own timeout; its output goes to $LOG as well.
run() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
  echo "| $name | $status | $((SECONDS - start)) s |" >>"$OUT/summary.md"
}

printf '| step | exit | time |\n|---|---|---|\n' >"$OUT/summary.md"
run environment 20 python3 -c "
import torch, transformers, accelerate, datasets
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'datasets', datasets.__version__)
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

if [ "$DEVICE" = cpu ]; then
  THROUGHPUT=(--device cpu --steps 2 --warmup-steps 1 --batch-size 4 --preset clip-tiny)
  ACCUMULATION=(--device cpu --smoke)
  DEMO=(python3 -m accelerate.commands.launch --cpu --num_processes 1 -m clip_accel)
  DEMO_FP16=(python3 tests/fp16_cpu.py)  # Accelerate's fp16 path kept on CPU (see that file)
  DEMO_OPTIONS=(--max_steps 4 --eval_steps 4)
  GPUS=0
else
  THROUGHPUT=(--device cuda --steps 30 --warmup-steps 5 --batch-size 256)
  ACCUMULATION=(--device cuda)
  DEMO=(python3 -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml -m clip_accel)
  DEMO_FP16=("${DEMO[@]}")
  DEMO_OPTIONS=()
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
DEMO_RUN=(train --config demo --overwrite_output_dir "${DEMO_OPTIONS[@]}")

run throughput 180 python3 benchmarks/gpu_throughput.py "${THROUGHPUT[@]}" \
  --only "clip_accel trainer as shipped" "clip_accel step" "(reference)" "real loader instead" \
  --markdown "$OUT/throughput.md"
run accumulation 90 python3 benchmarks/accumulation.py "${ACCUMULATION[@]}" --markdown "$OUT/accumulation.md"
run demo 75 "${DEMO[@]}" "${DEMO_RUN[@]}" --mixed_precision bf16 --output_dir /tmp/clip_accel_gpu_demo
run demo_fp16 60 "${DEMO_FP16[@]}" "${DEMO_RUN[@]}" --mixed_precision fp16 --output_dir /tmp/clip_accel_gpu_fp16
run open_clip 45 python3 benchmarks/open_clip_step.py --device "$DEVICE" --markdown "$OUT/open_clip.md"
if [ "${GPUS:-0}" -ge 2 ]; then
  run ddp_2_gpus 50 python3 -m accelerate.commands.launch --config_file accelerate_configs/multi_gpu.yaml \
    --num_processes 2 -m clip_accel "${DEMO_RUN[@]}" --mixed_precision bf16 --output_dir /tmp/clip_accel_gpu_ddp
fi
cat "$OUT/summary.md"
