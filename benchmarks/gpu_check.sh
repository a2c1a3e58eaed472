#!/usr/bin/env bash
# The prepared GPU check (a lent H100/H200). It starts with the DECISION RUN of issue #13: the train-step batch sweep
# and variant matrix, one JSON (decision_<device>.json, rows written as they finish) and a table naming the fastest
# variant per arch and batch; the defaults (model.*, train.*, the README's batch per GPU) are set from it. The older
# checks follow only with GPU_CHECK_ALL=1 (or by name in GPU_CHECK_ONLY).
#
# Decision run budget, estimated from the H100 rows in benchmarks/results/train_*_nvidia-h100-80gb-hbm3.json (their
# p50_ms per step at B=64, taken as linear in B; their extra.warmup_s: building the models and DeepSpeed per row, and
# torch.compile per new graph), 7 timed steps per row (2 warm-up: the graph's eager step and its capture, then 5):
#   ViT-S  ours, packed, graph, packed-graph x B 64/128/256: 4 x (7.5 + 8.1 + 9.1)             ~  99 s
#          reference, reference repo x B 64/128/256:            2 x (7.7 + 8.4 + 9.8)          ~  52 s
#   ViT-B  ours, packed, graph x B 64/128/256:                  3 x (7.9 + 8.8 + 10.6)         ~  82 s
#          reference x B 64/128/256:                              8.1 + 9.1 + 11.3             ~  29 s
#   ViT-S B=128 compiled (~70 s compile), compiled+reduce-overhead (~25 s, inductor's cache warm),
#          best = compiled+packed+graph (~65 s, a new graph): ~8 s each besides                ~ 185 s
#   env 16 s                                                                            total  ~ 463 s = 7.7 min
# (B=256 of ViT-B may not fit an 80 GB H100 beside the reference's fp16 copies: such a row is recorded as an error.)
# Rows run in that order, so a cut at the 470 s limit costs the compiled rows first; the JSON keeps every finished row.
#
# Writes results and one log into $OUT when set (the device tool's output folder), else benchmarks/results/.
# Packages the GPU machine lacks travel as wheels in .whl/ (make gpu-wheels builds them here: deepspeed and its
# pure-Python needs); the reference repository's files travel in the ignored .reference/dino/ (main_dino.py,
# utils.py, vision_transformer.py of facebookresearch/dino; the device tool's carry: [".whl", ".reference"]).
# DALI and FFCV cannot travel, so their GPU modes are skipped there and say so.
#
#   bash benchmarks/gpu_check.sh                 # the decision run, ~7.7 minutes on an H100
#   GPU_CHECK_ONLY="env ffcv-import bench-loaders bench-train-ffcv dali-gpu" bash benchmarks/gpu_check.sh
#                                                # the data path of issue #15 (~2.5 minutes): a second device call,
#                                                # since one call is limited to 10 minutes (carry .whl, .ffcv_carry)
#   GPU_CHECK_ALL=1 bash benchmarks/gpu_check.sh # then the CUDA tests, kernel benchmarks, profile, demo training
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
ALL=${GPU_CHECK_ALL:-0}

step() {  # step NAME TIMEOUT_S CMD...   (after the decision run only with GPU_CHECK_ALL=1 or named in ONLY)
  local name=$1 limit=$2; shift 2
  last_rc=skipped
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -z "$ONLY" ] && [ "$ALL" != 1 ] && [ "$name" != env ] && [ "$name" != decision ]; then return; fi
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  last_rc=$rc
  status+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

# Most telling first: a step that runs out of time must not cost the ones before it.
step env 60 $PY -c "import torch, triton, timm, deepspeed; print(torch.__version__, triton.__version__, \
timm.__version__, deepspeed.__version__, torch.cuda.get_device_name(0))"
# THE DECISION RUN (budget above). Providers: ours (the step object, eager), ours-packed (model.packed_crops),
# ours-graph (train.cuda_graph: the whole step replayed), ours-packed-graph, and at ViT-S B=128 the compiled ones:
# ours-compiled, ours-cudagraphs (model.compile_mode=reduce-overhead, the fallback), ours-best (compiled + packed +
# whole-step graph); reference = the reference step in plain PyTorch (fp16 + GradScaler), reference-repo = the
# reference repository's own ViT, loss and helpers (when .reference/dino travelled).
S=vit_small_patch16_224
B=vit_base_patch16_224
PROVIDERS=ours,ours-packed,ours-graph,ours-packed-graph,reference
AT=(--at ours-packed-graph=$S:64,$S:128,$S:256 --at ours-compiled=$S:128 --at ours-cudagraphs=$S:128
    --at ours-best=$S:128)
if [ -f .reference/dino/main_dino.py ]; then
  PROVIDERS+=,reference-repo
  AT+=(--reference-repo .reference/dino --at reference-repo=$S:64,$S:128,$S:256)
fi
step decision 470 $PY -m benchmarks.bench_train --archs $S,$B --batches 64,128,256 --modes synthetic \
  --providers $PROVIDERS,ours-compiled,ours-cudagraphs,ours-best "${AT[@]}" --steps 5 --warmup 2 --name decision
# The older checks (GPU_CHECK_ALL=1): the CUDA tests of the step (graph vs eager) and the kernels come first.
step cuda-step-tests 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_step.py
step bench-train 260 $PY -m benchmarks.bench_train --archs ${BENCH_ARCHS:-vit_small_patch16_224} \
  --modes synthetic --providers ours,ours-compiled,ours-cudagraphs,reference --steps 10 --warmup 3
# Where the step's time goes (GPU kernels, host launches or syncs): ViT-S/16 B=64, ours (per train_step phase) and
# the reference, 4 profiled steps each, then the same op graph at negligible arithmetic (the host floor: what the
# host alone costs per step). A profiler that cannot trace the GPU is recorded in the JSON; a run that dies (a
# crash, not a timeout) before writing its first result gets one host-only rerun.
PROFILE_ARGS=(--archs vit_small_patch16_224 --providers ours,reference --steps 4 --warmup 3 --host-floor also)
t_profile=$(date +%s)
step bench-profile 100 $PY -m benchmarks.bench_profile "${PROFILE_ARGS[@]}"
if [[ $last_rc =~ ^[0-9]+$ ]] && [ "$last_rc" -ne 0 ] && [ "$last_rc" -ne 124 ] \
    && [ -z "$(find "$OUT_DIR" -maxdepth 1 -name 'profile_*.json' -newermt "@$t_profile")" ]; then
  step bench-profile 60 $PY -m benchmarks.bench_profile "${PROFILE_ARGS[@]}" --no-device-trace
fi
# The demo recipe trained 2x longer than `make demo` (a 600-step budget: 16 epochs of 37 steps), k-NN every 8 epochs:
# it must keep learning (its k-NN accuracy per evaluation goes to train_demo_metrics.jsonl; an earlier run's, of the
# batch-32 recipe: results/train_demo_metrics_*.jsonl). (optim.epochs alone is refused by a step-budget recipe.) The
# earlier run trained 1,500 steps × 32 = 48k images in ~78 s; 592 steps × 64 = 38k images should take ~62 s of 80.
step train-demo 80 $PY -m dino_fast.train --config dino_fast/configs/demo.yaml optim.total_steps=600 \
  eval.knn_every_epochs=8 data.num_workers=12 checkpoint.output_dir=/tmp/gpu_demo checkpoint.every_steps=0 \
  logging.progress=plain logging.print_every=250
cp /tmp/gpu_demo/metrics.jsonl "$OUT_DIR/train_demo_metrics.jsonl" 2>/dev/null
step cuda-tests 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_ops_dino_loss.py tests/test_ops_ema.py \
  tests/test_gpu_augment.py
step bench-augment 40 $PY -m benchmarks.bench_augment
# torch.compile of the reference loss only for the first (real-size) configuration: the others add as much again
# (the compile rows' extra.first_call_s in results/bench_loss_nvidia-h100-80gb-hbm3.json).
step bench-loss 70 $PY -m benchmarks.bench_loss --compile-budget-s 10
# End to end with the baseline torch/PIL loader on the machine's cores (DALI and FFCV cannot be carried there).
step bench-train-torch 90 $PY -m benchmarks.bench_train --archs vit_small_patch16_224 --modes torch \
  --providers ours,reference --steps 12 --warmup 3 --images 1000 --workers 14 --name train_torch_loader
step bench-ema 45 $PY -m benchmarks.bench_ema
# (bench_loaders is not run here: DALI and FFCV cannot be carried to the lent machine. $OUT returns at most 8
# files: the decision run writes 2 (the log, decision_<device>.json); with GPU_CHECK_ALL=1 it is 9, so name the
# older steps in GPU_CHECK_ONLY to keep within 8.)

# ======================================================================================== data path (issue #15)
# FFCV travels in .ffcv_carry/ (`make ffcv-carry`: the package, its extension for Python 3.12 and the shared libraries
# it links, ~23 MiB; carry it with .whl). DALI cannot travel (~1 GB): its step says "not installed" there.
# Budget on 16 cores (estimates, never run there yet): ffcv-import 5 + bench-loaders ~80 (512x384 JPEGs generated and
# converted to .betons at longest side 256/384/512 ~15, FFCV's numba compile per loader ~10 each, torch baseline 3
# epochs ~25, FFCV 3 x 3 epochs ~10) + bench-train-ffcv ~45 + dali-gpu 5 ≈ 135 s.
# Results go to /tmp/data_check/ and are merged into one file, printed into the log and written as
# $OUT/data_path.json only while $OUT holds fewer than 8 files (the device tool returns at most 8).
DATA_TMP=/tmp/data_check
rm -rf "$DATA_TMP" && mkdir -p "$DATA_TMP"
FFCV_ENV=(env "PYTHONPATH=$PWD/.ffcv_carry/site:${PYTHONPATH:-}" "LD_LIBRARY_PATH=$PWD/.ffcv_carry/lib:${LD_LIBRARY_PATH:-}")
if [ -d .ffcv_carry/site/ffcv ]; then
  step ffcv-import 60 "${FFCV_ENV[@]}" $PY -c "import ffcv, ffcv.libffcv, pipelines.ffcv_ops, sys; \
print('ffcv', ffcv.__file__, ffcv.libffcv.lib._name, 'python', sys.version.split()[0])"
else
  echo "=== ffcv: .ffcv_carry/ missing (run make ffcv-carry here and carry .ffcv_carry): FFCV steps skipped" | tee -a "$LOG"
fi
# Loader throughput, 14 workers, 2x224+10x96, batch 64: the torch/PIL baseline on the 512x384 JPEGs, FFCV on them
# stored at longest side 256, 384 and 512 (target: >= 3,000 img/s so it never starves a 2,500 img/s step).
step bench-loaders 150 "${FFCV_ENV[@]}" DINO_FAST_BENCH_DIR=/tmp/bench_images $PY -m benchmarks.bench_loaders \
  --device cuda --backends torch,ffcv --configs 2x224+10x96 --workers 14 --batch-size 64 --images 1536 --rounds 2 \
  --image-size 512x384 --ffcv-resolutions 256,384,512 --out "$DATA_TMP/loaders.json"
# End to end: ViT-S/16 B=64 fed by FFCV (img/s and the share of step time spent waiting for data; target <= 5%).
step bench-train-ffcv 120 "${FFCV_ENV[@]}" DINO_FAST_BENCH_DIR=/tmp/bench_images $PY -m benchmarks.bench_train \
  --archs vit_small_patch16_224 --modes ffcv --providers ours --steps 15 --warmup 3 --images 1536 --workers 14 \
  --out "$DATA_TMP/train_ffcv.json"
# DALI's GPU graph where DALI is installed (build, contract, statistics vs the CPU graph, 50 timed runs per
# hw_decoder_load x threads); on the lent machine it only reports "not installed".
step dali-gpu 240 $PY -m benchmarks.dali_gpu_check --runs 50 --out "$DATA_TMP/dali_gpu.json"
$PY - "$DATA_TMP" "$OUT_DIR" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
text = json.dumps(merged, indent=1, default=str)
print("=== data_path.json begin\n" + text + "\n=== data_path.json end")
if len([p for p in out.iterdir() if p.is_file()]) < 8:
    (out / "data_path.json").write_text(text + "\n")
PYEOF
# ==================================================================================== end of the data-path block

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${status[@]}" | tee -a "$LOG"
grep -hE "ours / reference|speedup|x vs|-bound:" "$LOG" | tail -20
grep -A 14 "fastest variant per arch and batch" "$LOG" | tail -15
