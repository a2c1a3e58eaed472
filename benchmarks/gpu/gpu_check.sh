#!/usr/bin/env bash
# The prepared GPU check, for the rare lent H100/H200 (about 15 minutes in all, start-up included). Here first:
#   make gpu-prep        # builds .whl/ and .ffcv_carry/, checks .reference/dino/, prints the device tool's calls
# then on the lent machine (the device tool; carry [".whl", ".ffcv_carry", ".reference"]):
#   bash benchmarks/gpu/gpu_check.sh           # THE DECISION RUN: its own deadline 480 s (timeout_s 540)
#   bash benchmarks/gpu/gpu_check.sh data      # optional second command, the data path: deadline 240 s (timeout_s 300)
#   GPU_CHECK_REHEARSAL=1 OUT=DIR bash ...     # every step at tiny shapes on this machine's device (make test: CPU)
#
# Every step writes its result file straight into $OUT as it ends (≤ 8 files per command: the log, summary.json and
# one file per step) and rewrites summary.json (benchmarks/gpu/summary.py: each step's exit code and time, the gate,
# the decision rows against the targets), so a run cut off at any point returns everything it finished. Error rows
# keep the whole exception chain; a configuration whose predicted peak exceeds the free memory is recorded as "does
# not fit" instead of running out of memory. A step never runs past the command's deadline.
#
# Decision run, most telling first (estimates for an H100 from benchmarks/results/*_nvidia-h100-80gb-hbm3.json:
# build ~4 s a row (DeepSpeed, models; Triton's first compile in the first row), a ViT-S/16 step at B=64 75-92 ms,
# ViT-B/16 130 ms, ViT-L/16 ~3x ViT-B, linear in B; 2 warm-up + 5 timed steps; ~8 s of Python start-up a step):
#   env        versions, device, free memory, installs .whl                                      ~ 16 s
#   gate       graph = eager, packed = unpacked, EMA on device = float (benchmarks/gpu/gate.py)  ~ 25 s
#   decision   ViT-S/16 B 128, 64, 256 x ours, ours-packed, ours-graph, ours-packed-graph,
#              reference, reference-repo (18 rows)                                               ~ 115 s
#              ViT-B/16 B 64, 128 x ours, ours-graph, ours-packed-graph, reference (8 rows)      ~ 60 s
#   memory     ViT-B/16 and ViT-L/16 B=64 x ours, ours-ckpt (img/s and peak GiB; ViT-L ~3x ViT-B) ~ 50 s
#   resnet     ResNet-50 (SGD, channels_last) B=64 x ours, reference (into the decision file)     ~ 25 s
#   ema        the graph step's EMA: foreach lerp vs the Triton kernel, both momentum on device  ~ 15 s
#   cuda-tests the CUDA tests of the kernels and the step (pytest -m cuda; 21 s on the H100)    ~ 30 s
#   compiled   ours-best (compiled + packed + whole-step graph) at ViT-S/16 B=128                 ~ 85 s
#                                                                                       total    ~ 421 s
# The rows are 2x224+10x96, K=65536, bf16 (the reference: fp16 + GradScaler), synthetic crops on the device.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:-decision}
OUT_DIR=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT_DIR"
export OUT=$OUT_DIR PYTHONUNBUFFERED=1
LOG=$OUT_DIR/gpu_check.log
PY=${PYTHON:-python3}
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
rm -f "$OUT_DIR/summary.json"
: >"$LOG"

case $PART in
  decision) BUDGET=${GPU_CHECK_DEADLINE:-480} ;;
  data) BUDGET=${GPU_CHECK_DEADLINE:-240} ;;
  *) echo "usage: $0 [decision|data]" >&2; exit 2 ;;
esac
DEADLINE=$((SECONDS + BUDGET))

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

step() {  # step NAME LIMIT_S CMD...: runs CMD within LIMIT_S and the command's deadline, then updates the summary
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, the deadline is reached" | tee -a "$LOG"
    $PY -m benchmarks.gpu.summary "$OUT_DIR" --step "$name" --rc skipped --seconds 0 --limit 0 >>"$LOG" 2>&1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  $PY -m benchmarks.gpu.summary "$OUT_DIR" --step "$name" --rc "$rc" --seconds $((SECONDS - t0)) --limit "$limit" \
    >>"$LOG" 2>&1
}

# The shapes: the real ones, or tiny ones for the rehearsal (the same steps, arguments and files).
S=vit_small_patch16_224 B=vit_base_patch16_224 L=vit_large_patch16_224
SHAPE=(--locals 10 --global-size 224 --local-size 96 --out-dim 65536)
R=resnet50 R_SHAPE=("${SHAPE[@]}" --set optim.name=sgd model.drop_path_rate=0)
STEPS=(--steps 5 --warmup 2)
EMA_ARGS=()
BS_S=128,64,256 BS_B=64,128 B_MID=128 B_MEM=64
if [ "$REHEARSAL" = 1 ]; then
  S=vit_tiny_patch16_224 B=vit_small_patch16_224 L=vit_base_patch16_224
  SHAPE=(--locals 2 --global-size 32 --local-size 16 --out-dim 256 --set model.depth=1 model.head_hidden_dim=64
         model.head_bottleneck_dim=32)
  R=resnet18 R_SHAPE=(--locals 2 --global-size 32 --local-size 16 --out-dim 256 --set optim.name=sgd
                      model.drop_path_rate=0 model.head_hidden_dim=64 model.head_bottleneck_dim=32)
  STEPS=(--steps 1 --warmup 1)
  EMA_ARGS=(--quick --iters 2)
  BS_S=8,4,16 BS_B=4,8 B_MID=8 B_MEM=4
fi

if [ "$PART" = decision ]; then
  step env 60 $PY -c "import json, torch, triton, timm, deepspeed
cuda = torch.cuda.is_available()
print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'timm': timm.__version__,
  'deepspeed': deepspeed.__version__, 'device': torch.cuda.get_device_name(0) if cuda else 'cpu',
  'free_gib': torch.cuda.mem_get_info()[0] / 2**30 if cuda else None}))"
  step gate 60 $PY -m benchmarks.gpu.gate
  PROVIDERS=ours,ours-packed,ours-graph,ours-packed-graph,reference
  REPO_ARGS=()
  if [ -f .reference/dino/main_dino.py ]; then
    PROVIDERS+=,reference-repo
    REPO_ARGS=(--reference-repo .reference/dino)
  else
    echo "=== .reference/dino/ missing (make gpu-prep says how to fill it): no reference-repo rows" | tee -a "$LOG"
  fi
  step decision-s 200 $PY -m benchmarks.bench_train --archs $S --batches $BS_S --modes synthetic \
    --providers $PROVIDERS "${REPO_ARGS[@]}" "${SHAPE[@]}" "${STEPS[@]}" --name decision
  step decision-b 120 $PY -m benchmarks.bench_train --archs $B --batches $BS_B --modes synthetic \
    --providers ours,ours-graph,ours-packed-graph,reference "${SHAPE[@]}" "${STEPS[@]}" --name decision --append
  # Which card fits which recipe: ViT-B/16 and ViT-L/16 at B=64 with and without activation checkpointing, img/s
  # and peak memory side by side (a configuration predicted not to fit is recorded as such, not run).
  step memory 90 $PY -m benchmarks.bench_train --archs $B,$L --batches $B_MEM --modes synthetic \
    --providers ours,ours-ckpt "${SHAPE[@]}" "${STEPS[@]}" --name memory
  # The paper's ResNet-50 recipe (SGD, channels_last, bf16) against the reference step, into the decision file.
  step resnet 60 $PY -m benchmarks.bench_train --archs $R --batches $B_MEM --modes synthetic \
    --providers ours,reference "${R_SHAPE[@]}" "${STEPS[@]}" --name decision --append
  step ema 40 $PY -m benchmarks.bench_ema "${EMA_ARGS[@]}"
  # The CUDA tests of the kernels and the step (loss, EMA, photometric augmentation, graph vs eager), as JUnit XML.
  step cuda-tests 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ops_dino_loss.py tests/test_ops_ema.py \
    tests/test_gpu_augment.py tests/test_step.py --junitxml "$OUT_DIR/cuda_tests.xml"
  step compiled 120 $PY -m benchmarks.bench_train --archs $S --batches $B_MID --modes synthetic --providers ours-best \
    "${SHAPE[@]}" "${STEPS[@]}" --name decision --append
else
  # The data path. FFCV travels in .ffcv_carry/ (make ffcv-carry: the package, its extension for Python 3.12 and the
  # shared libraries it links, ~23 MiB); DALI cannot travel (~1 GB): its step reports "not installed" there.
  # Estimates on 16 cores: ffcv-import 5 + loaders ~80 + train-ffcv ~45 + dali-gpu 5 ≈ 135 s of the 240.
  if [ -d .ffcv_carry/site/ffcv ]; then
    export PYTHONPATH=$PWD/.ffcv_carry/site:$PYTHONPATH LD_LIBRARY_PATH=$PWD/.ffcv_carry/lib:${LD_LIBRARY_PATH:-}
  fi
  IMAGES=1536 WORKERS=14 RES=256,384,512 ROUNDS=2 BATCH=64 DATA_SHAPE=(--configs 2x224+10x96 --image-size 512x384)
  if [ "$REHEARSAL" = 1 ]; then
    IMAGES=48 WORKERS=2 RES=64 ROUNDS=1 BATCH=8 DATA_SHAPE=(--configs 2x32+2x16 --image-size 96x64 --warmup 1)
  fi
  step ffcv-import 60 $PY -c "import ffcv, ffcv.libffcv, pipelines.ffcv.decoder, sys; \
print('ffcv', ffcv.__file__, ffcv.libffcv.lib._name, 'python', sys.version.split()[0])"
  # Loader throughput: the torch/PIL baseline on the JPEGs, FFCV on them stored at longest side 256/384/512
  # (target: ≥ 3,000 img/s, so it never starves a 2,500 img/s step).
  step loaders 120 env DINO_FAST_BENCH_DIR=/tmp/bench_images $PY -m benchmarks.bench_loaders --backends torch,ffcv \
    --workers $WORKERS --images $IMAGES --rounds $ROUNDS --batch-size $BATCH --ffcv-resolutions $RES \
    "${DATA_SHAPE[@]}" \
    --out "$OUT_DIR/loaders.json"
  # End to end: ViT-S/16 fed by FFCV (img/s and the share of the step spent waiting for data; target ≤ 5%).
  step train-ffcv 90 env DINO_FAST_BENCH_DIR=/tmp/bench_images $PY -m benchmarks.bench_train --archs $S \
    --modes ffcv --providers ours --batch $BATCH "${SHAPE[@]}" "${STEPS[@]}" --images $IMAGES --workers $WORKERS \
    --out "$OUT_DIR/train_ffcv.json"
  step dali-gpu 60 $PY -m benchmarks.gpu.dali_gpu_check --runs 20 --out "$OUT_DIR/dali_gpu.json"
fi

echo "=== summary ($PART, $((SECONDS)) s of $BUDGET)" | tee -a "$LOG"
$PY -m benchmarks.gpu.summary "$OUT_DIR" | tee -a "$LOG"
