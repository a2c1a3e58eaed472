#!/usr/bin/env bash
# The one prepared GPU check (a lent H100/H200, under 8 minutes): CUDA tests, kernel benchmarks, the train-step
# benchmark (synthetic data), and a short real training run through DeepSpeed on the GPU.
#
# Writes results and one log into $OUT when set (the device tool's output folder), else benchmarks/results/.
# Packages the GPU machine lacks travel as wheels in .whl/ (make gpu-wheels builds them here: deepspeed and its
# pure-Python needs); DALI and FFCV cannot travel, so their GPU modes are skipped there and say so.
#
#   bash benchmarks/gpu_check.sh            # everything, ~8 minutes on an H100 (steps most telling first)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export OUT=$OUT_DIR PYTHONUNBUFFERED=1
LOG=$OUT_DIR/gpu_check.log
PY=${PYTHON:-python3}
: >"$LOG"
status=()

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

ONLY=${GPU_CHECK_ONLY:-}  # e.g. GPU_CHECK_ONLY="bench-train train-demo" runs just those steps

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  status+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

# Most telling first: a step that runs out of time must not cost the ones before it.
step env 60 $PY -c "import torch, triton, timm, deepspeed; print(torch.__version__, triton.__version__, \
timm.__version__, deepspeed.__version__, torch.cuda.get_device_name(0))"
# The train step: ours eager, ours with torch.compile'd backbones (compile time is reported as warmup_s), reference.
step bench-train 260 $PY -m benchmarks.bench_train --archs ${BENCH_ARCHS:-vit_small_patch16_224,vit_base_patch16_224} \
  --modes synthetic --providers ours,ours-compiled,reference --steps 10 --warmup 3
# The demo recipe trained 4x longer than `make demo` (1,200 steps, ~700 img/s on 16 cores), k-NN every 4 epochs:
# it must keep learning (measured: 55% → 99% by step 750).
step train-demo 110 $PY -m dino_fast.train --config dino_fast/configs/demo.yaml optim.epochs=16 \
  eval.knn_every_epochs=4 data.num_workers=12 checkpoint.output_dir=/tmp/gpu_demo checkpoint.every_steps=0 \
  logging.progress=plain logging.print_every=250
cp /tmp/gpu_demo/metrics.jsonl "$OUT_DIR/train_demo_metrics.jsonl" 2>/dev/null
step cuda-tests 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ops_dino_loss.py tests/test_ops_ema.py \
  tests/test_gpu_augment.py
step bench-augment 40 $PY -m benchmarks.bench_augment
step bench-loss 100 $PY -m benchmarks.bench_loss
# End to end with the baseline torch/PIL loader on the machine's cores (DALI and FFCV cannot be carried there).
step bench-train-torch 90 $PY -m benchmarks.bench_train --archs vit_small_patch16_224 --modes torch \
  --providers ours,reference --steps 12 --warmup 3 --images 1000 --workers 14 --name train_torch_loader
step bench-ema 45 $PY -m benchmarks.bench_ema
# (bench_loaders is not run here: DALI and FFCV cannot be carried to the lent machine, and $OUT returns 8 files.)

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${status[@]}" | tee -a "$LOG"
grep -hE "ours / reference|speedup|x vs" "$LOG" | tail -20
