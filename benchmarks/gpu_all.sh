#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one call on a lent GPU machine (one H100, 16 CPU
# cores, no network), in under 8 minutes: each step runs under `timeout` with its own budget (below),
# so a hung step costs its budget and no more. Writes $OUT/gpu_all.md (every table, the device, the
# versions, each step's exit status and time) and $OUT/gpu_all.log (all output, stderr included).
#
# Before: `bash benchmarks/gpu_wheels.sh` here fills .whl/ (timm, a slimmed Ray, jsonschema and its
# needs; about 44 MB). Then, on the device tool: run(command="bash benchmarks/gpu_all.sh",
# carry=[".whl"], timeout_s=540).
# Dry run on a CPU machine (tiny sizes, every step, same wiring): GPU_ALL_DRY=1 bash benchmarks/gpu_all.sh
# (PY=python to use; OUT=folder for the results, default /tmp/gpu_all).
#
# Steps and budgets (seconds; 500 in all, plus at most 5 s each to kill a step that ignores SIGTERM):
#   setup 40         install .whl/ into /tmp/site; lnstd, with jobs/ as lnstd.jobs, into a scratch folder
#   info 15          device, driver, cores, torch / torchvision / timm / ray versions
#   check 50         check_device.py: CUDA maps == CPU maps, fused and unfused, every method; bf16 corr
#   explain_fp32 80  bench_explain.py: ViT-B/16 and Swin-T, batch 64, both captures, every method
#   explain_bf16 65  the same under bf16 autocast
#   decode 50        bench_decode.py: per-core CPU decoders (1 and 16 threads) and nvjpeg on the GPU
#   job 140          bench_job.py: 2048 photo-like JPEGs, ViT-B/16 gae+lnstd, job vs bare, CPU and GPU
#                    decode, GPU busy fraction
#   faithfulness 60  bench_faithfulness.py: deletion, insertion, ROAD batched on the GPU (ViT-S/16, 224
#                    px, 32 images) against the model's forwards alone; CG against SciPy's direct solve
# A step cut short keeps what it printed (bench_explain prints each model's table when it is done).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_all}
DRY=${GPU_ALL_DRY:-0}
mkdir -p "$OUT"
MD=$OUT/gpu_all.md
LOG=$OUT/gpu_all.log
SCRATCH=$(mktemp -d)
: >"$LOG"
START=$SECONDS

if [ "$DRY" = 1 ]; then
  PY=${PY:-python3}
  DEV=cpu
  GPUS=0
  SCALE=4 # the 2-core build machine is slow: every budget times 4
else
  PY=${PY:-python3}
  DEV=cuda
  GPUS=1
  SCALE=1
fi

# step NAME BUDGET CMD...: run CMD under timeout from the scratch folder, append its stdout to the
# report and everything to the log.
step() {
  local name=$1 budget=$(($2 * SCALE)) t=$SECONDS rc
  shift 2
  echo "=== $(date -u +%H:%M:%S) $name (budget ${budget}s): $*" >>"$LOG"
  (cd "$SCRATCH" && timeout -k 5 "$budget" "$@") >"$SCRATCH/$name.out" 2>"$SCRATCH/$name.err"
  rc=$?
  cat "$SCRATCH/$name.out" "$SCRATCH/$name.err" >>"$LOG"
  {
    echo "## $name"
    echo
    local note=""
    [ $rc = 124 ] && note=" (TIMED OUT: what it printed before)"
    echo "\`${*#"$PY "}\`: exit $rc$note, $((SECONDS - t)) s of its ${budget} s"
    echo
    cat "$SCRATCH/$name.out"
    if [ $rc != 0 ]; then
      echo
      echo '```'
      tail -n 30 "$SCRATCH/$name.err"
      echo '```'
    fi
    echo
  } >>"$MD"
  echo "$name: exit $rc in $((SECONDS - t)) s" | tee -a "$LOG"
  return 0
}

{
  echo "# lnstd GPU benchmarks ($( [ "$DRY" = 1 ] && echo 'DRY RUN on CPU, tiny sizes' || echo 'one call'))"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} >"$MD"

# --- setup: wheels and the package as installed (lnstd.jobs is the top-level jobs/ folder) ---------
SITE=/tmp/site
setup() {
  set -e
  if [ "$DRY" != 1 ]; then
    ls "$ROOT"/.whl/*.whl >/dev/null # run benchmarks/gpu_wheels.sh here first, and carry .whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$ROOT"/.whl/*.whl
  fi
  mkdir -p "$SCRATCH/src"
  cp -r "$ROOT/lnstd" "$SCRATCH/src/lnstd"
  rm -rf "$SCRATCH/src/lnstd/jobs"
  cp -r "$ROOT/jobs" "$SCRATCH/src/lnstd/jobs"
  echo "installed: $(ls "$ROOT"/.whl 2>/dev/null | tr '\n' ' ')"
}
export -f setup
export PY DRY ROOT SCRATCH SITE
step setup 40 bash -c setup
if [ "$DRY" = 1 ]; then
  export PYTHONPATH=$SCRATCH/src
else
  export PYTHONPATH=$SITE:$SCRATCH/src
fi
B=$ROOT/benchmarks

# --- info ---------------------------------------------------------------------------------------
info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "$(nproc) CPU cores, $(free -g | awk '/Mem:/ {print $2}') GiB memory"
  "$PY" -c "import sys, torch, torchvision, timm, ray, lnstd, lnstd.jobs
print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| timm', timm.__version__, '| ray', ray.__version__, '| cuda', torch.version.cuda,
      '| lnstd from', lnstd.__file__)"
}
export -f info
step info 15 bash -c info

# --- the measurements -------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  MODELS=vit_small_patch16_224
  step check 50 "$PY" "$B/check_device.py" --device cpu --models "$MODELS" --batch 1 --methods lnstd,gae
  for p in fp32 bf16; do
    step "explain_$p" 40 "$PY" "$B/bench_explain.py" --device cpu --precision $p --models "$MODELS" \
      --batch 2 --repeats 1 --loop-images 1 --methods lnstd,gradcam
  done
  step decode 50 "$PY" "$B/bench_decode.py" --device cpu --images 8 --repeats 1 --heatmap-images 2
  step job 60 "$PY" "$B/bench_job.py" --images 16 --batch-size 8 --shard-size 8 --methods lnstd \
    --cpus-per-actor 2 --decode cpu --timeout 200
  step faithfulness 60 "$PY" "$B/bench_faithfulness.py" --model vit_tiny_patch16_224 --size 32 --images 2 \
    --quantus-steps 8 --impute-images 1
else
  MODELS=vit_base_patch16_224,swin_tiny_patch4_window7_224
  step check 50 "$PY" "$B/check_device.py" --device cuda
  step explain_fp32 80 "$PY" "$B/bench_explain.py" --device cuda --precision fp32 --models "$MODELS" \
    --batch 64 --repeats 3 --loop-images 4
  step explain_bf16 65 "$PY" "$B/bench_explain.py" --device cuda --precision bf16 --models "$MODELS" \
    --batch 64 --repeats 3 --loop-images 4
  step decode 50 "$PY" "$B/bench_decode.py" --device cuda --images 128 --repeats 3 --threads "$(nproc)" \
    --heatmap-images 32
  step job 140 "$PY" "$B/bench_job.py" --images 2048 --model vit_base_patch16_224 --methods gae,lnstd \
    --batch-size 64 --shard-size 512 --cpus-per-actor "$(nproc)" --gpus-per-actor $GPUS --decode cpu,gpu \
    --timeout 60
  step faithfulness 60 "$PY" "$B/bench_faithfulness.py" --device cuda --size 224 --images 32 \
    --skip-references --impute-images 2
fi

echo "total: $((SECONDS - START)) s" | tee -a "$LOG"
echo "_total $((SECONDS - START)) s_" >>"$MD"
rm -rf "$SCRATCH"
