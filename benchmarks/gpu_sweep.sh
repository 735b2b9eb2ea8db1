#!/usr/bin/env bash
# The whole GPU benchmark sweep in one call, on a machine with a CUDA GPU:
#   1. builds fastkd._C with its CUDA kernels unless the installed build already has them;
#   2. `fastkd bench`: every op, fp32/bf16/fp16, the default GPU sizes -> table (bench.txt),
#      bench.csv, bench.json (versions, device, measured mm/copy peaks), PNG plots;
#   3. the pytest-benchmark suite (its default set; SWEEP=full: the big sweep) ->
#      pytest-benchmark.json and the grouped comparison tables (pytest-benchmark.txt);
# everything under benchmarks/results/<cuda-device-name>/, ready to commit.
#
# Environment: PY (default .venv/bin/python if it exists, else python3), DTYPES (default
# fp32,bf16,fp16), SWEEP=quick|default|full (default: default), MAX_JOBS for the CUDA build,
# SWEEP_SECONDS (default 570): wall-clock budget of the whole call. Each stage is stopped with
# SIGINT when the budget runs out and still writes what it measured (fastkd bench saves after
# every op and dtype; pytest-benchmark writes its JSON at session end), so a machine lent for
# 10 minutes a command gets results. SWEEP=full needs a larger SWEEP_SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DTYPES=${DTYPES:-fp32,bf16,fp16}
SWEEP=${SWEEP:-default}
case "$SWEEP" in quick|default|full) ;; *) echo "SWEEP must be quick, default or full" >&2; exit 2 ;; esac

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_sweep.sh: no CUDA device is visible")'

has_cuda_kernels='import sys, fastkd; from fastkd import _extension; sys.exit(0 if _extension.has_kernel("fkd_forward", "CUDA") else 1)'
if ! "$PY" -c "$has_cuda_kernels" 2>/dev/null; then
  echo "== building fastkd._C with CUDA kernels"
  FASTKD_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" setup.py -q build_ext --inplace
fi

DEV=$("$PY" -c 'from fastkd.bench import device_name; print(device_name("cuda"))')
OUT="benchmarks/results/$DEV"
mkdir -p "$OUT"
"$PY" -c 'import json, fastkd; print(json.dumps(fastkd.available_backends(), indent=1))' \
  > "$OUT/backends.json"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

BUDGET=${SWEEP_SECONDS:-570}
left() { echo $(( BUDGET - SECONDS > 30 ? BUDGET - SECONDS : 30 )); }

echo "== fastkd bench ($SWEEP, $DTYPES) -> $OUT"
level=()
if [ "$SWEEP" = quick ]; then level=(--quick); fi
# keep about 40% of what is left for the pytest-benchmark stage
bench_seconds=$(( $(left) * 6 / 10 ))
timeout --signal=INT --kill-after=30 "$bench_seconds" \
  "$PY" -m fastkd.cli bench --op all --device cuda --dtype "$DTYPES" --no-progress \
  ${level[@]+"${level[@]}"} | tee "$OUT/bench.txt" || echo "fastkd bench stopped early"

echo "== pytest-benchmark suite -> $OUT/pytest-benchmark.json"
full=()
if [ "$SWEEP" = full ]; then full=(--bench-full); fi
FASTKD_BENCH_DTYPES="$DTYPES" timeout --signal=INT --kill-after=30 "$(( $(left) - 15 ))" \
  "$PY" -m pytest benchmarks/ -q -p no:cacheprovider \
  --bench-device cuda ${full[@]+"${full[@]}"} \
  --benchmark-json "$OUT/pytest-benchmark.json" --benchmark-sort name \
  --benchmark-group-by group --benchmark-columns median,iqr,min,rounds \
  | tee "$OUT/pytest-benchmark.txt" || echo "pytest-benchmark stopped early or failed"

echo "== results in $OUT"
