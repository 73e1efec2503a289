#!/usr/bin/env bash
# The whole GPU check in one command, for a bare machine lent for a few minutes:
#
#   make gpu-check OUT=DIR        (= benchmarks/gpu_check.sh DIR)
#   benchmarks/gpu_check.sh DIR --dry-run     # list the steps and their time limits only
#
# Needs python3 with a CUDA torch and Triton, nvcc and cmake (>= 3.26); no package registry:
# pybind11 and pytest come from .whl/ (filled by `make gpu-wheels` where a registry is) into
# DIR/pydeps unless python3 already has them. Each step runs under its own `timeout` so one hang
# cannot eat the slot; the limits add up to under 9 minutes. Writes DIR/<step>.log,
# DIR/gpu.csv (the rows bench_gpu appended) and DIR/summary.json; the exit status is the
# number of failed steps (text/vocab are skipped, not failed, where transformers is absent).
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHL=${WHL:-$ROOT/.whl}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT/python:$OUT/pydeps${PYTHONPATH:+:$PYTHONPATH}"
# no pip install here: embgeom.kernels (package_dir in setup.py) is reached through a link
KLINK="$ROOT/python/embgeom/kernels"
NEEDS_HF="$PY -c 'import transformers' 2>/dev/null || { echo 'SKIP: transformers (and the default model) not importable here'; exit 3; }"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# name | seconds | command  (in this order: cheap and decisive first, the long benchmark last
# but one, so a slow machine still reports versions, build and tests)
STEPS=(
  "versions|20|$PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA DEVICE\")'; nvcc --version | tail -2; cmake --version | head -1; { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; }"
  "wheels|30|$PY -c 'import pybind11, pytest' 2>/dev/null || $PY -m pip install --no-index --find-links '$WHL' --target '$OUT/pydeps' pybind11 pytest"
  "build|100|{ [ -e '$KLINK' ] || ln -s ../../kernels '$KLINK'; } && ARCH=\$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f\"{c[0]}{c[1]}\")') && cmake -S '$ROOT' -B '$OUT/build' -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=\$(command -v $PY) -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DEMBGEOM_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=\$ARCH -DCMAKE_LIBRARY_OUTPUT_DIRECTORY='$ROOT/python/embgeom' && cmake --build '$OUT/build' -j \$(nproc) && $PY -m embgeom.info"
  "tests|110|cd '$ROOT' && $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py"
  "bench_262k|60|cd '$ROOT' && $PY benchmarks/bench_gpu.py --n 262144 --d 768 --dtype bf16 --workloads pairwise_stats row_topk10 --providers triton torch-chunked torch-mm-topk --repeats 2 --recheck"
  "bench_1m|120|cd '$ROOT' && $PY benchmarks/bench_gpu.py --n 1048576 --d 768 --dtype bf16 --workloads pairwise_stats row_topk10 --providers triton torch-chunked torch-mm-topk --repeats 1 --recheck"
  "text|40|$NEEDS_HF; cd '$ROOT' && $PY benchmarks/bench_text.py overhead --device cuda --repeats 3"
  "vocab|50|$NEEDS_HF; cd '$ROOT' && $PY -m embgeom vocab --device cuda --out '$OUT/vocab' 2>&1 | tail -25"
)

total=0
for s in "${STEPS[@]}"; do total=$((total + $(cut -d'|' -f2 <<<"$s"))); done
if [ "$DRY" = "--dry-run" ]; then
  i=0
  for s in "${STEPS[@]}"; do
    i=$((i + 1)); printf '%d %-15s %4ss  %s\n' "$i" "$(cut -d'|' -f1 <<<"$s")" "$(cut -d'|' -f2 <<<"$s")" "$(cut -d'|' -f3- <<<"$s")"
  done
  echo "total limit ${total}s"
  exit 0
fi

failed=0
json="["
csv0=$(wc -l < "$ROOT/benchmarks/results/gpu.csv" 2>/dev/null || echo 0)
for s in "${STEPS[@]}"; do
  name=$(cut -d'|' -f1 <<<"$s"); limit=$(cut -d'|' -f2 <<<"$s"); cmd=$(cut -d'|' -f3- <<<"$s")
  echo "== $name (limit ${limit}s)"
  t0=$SECONDS
  timeout -k 5 "$limit" bash -o pipefail -c "$cmd" > "$OUT/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  tail -n 15 "$OUT/$name.log"
  status=ok
  [ $rc -eq 3 ] && grep -q '^SKIP:' "$OUT/$name.log" && status=skipped
  [ $rc -ne 0 ] && [ $status != skipped ] && { status=failed; failed=$((failed + 1)); }
  echo "== $name: $status rc=$rc ${secs}s"
  json+="{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"limit\": $limit, \"timed_out\": $([ $rc -eq 124 ] && echo true || echo false), \"log\": \"$name.log\"},"
done
if [ -f "$ROOT/benchmarks/results/gpu.csv" ]; then
  { head -1 "$ROOT/benchmarks/results/gpu.csv"; tail -n +$((csv0 + 1)) "$ROOT/benchmarks/results/gpu.csv" | grep -v '^metric,'; } > "$OUT/gpu.csv"
fi
sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "${json%,}]" | $PY -c "import json, sys; steps = json.load(sys.stdin); json.dump(dict(git_sha='$sha', failed=$failed, steps=steps), open('$OUT/summary.json', 'w'), indent=1)"
echo "gpu-check: $failed failed step(s); logs, gpu.csv and summary.json in $OUT"
exit $failed
