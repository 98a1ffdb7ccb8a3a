#!/usr/bin/env bash
# The GPU step table: one liveavatar-14b DiT stage at 704x384 (random weights) for batch 1, 2 and 4 sessions per
# forward, in bf16 and FP8, with torch.compile off and on (bench/model_step.py). One JSON file per variant, the
# GPU's name and a log go to the folder given (default $OUT, else /tmp/model_step). Each variant has its own time
# limit, so one that hangs (a slow compile) leaves the others' results.
#
#   bash bench/gpu_model_step.sh [OUT_DIR]
#   CONFIG=tiny DEVICE=cpu DTYPE=fp32 BATCH=1,2 bash bench/gpu_model_step.sh /tmp/x   # a dry run without a GPU
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/model_step}}
CONFIG=${CONFIG:-liveavatar-14b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
BATCH=${BATCH:-1,2,4}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH=services${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG="$OUT_DIR/log.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } > "$OUT_DIR/gpu.txt" 2>&1

variant() {  # name, time limit (s), extra model_step flags
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$PY" bench/model_step.py --json --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" \
        --dit-only --batch "$BATCH" --blocks "${BLOCKS:-10}" --warmup "${WARMUP:-3}" "$@" \
        > "$OUT_DIR/$name.json" 2>> "$LOG"
    echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
    cat "$OUT_DIR/$name.json"
}

variant bf16 "${LIMIT_EAGER:-120}"
variant fp8 "${LIMIT_EAGER:-120}" --fp8
variant bf16_compile "${LIMIT_COMPILE:-180}" --compile
variant fp8_compile "${LIMIT_COMPILE_FP8:-150}" --fp8 --compile
