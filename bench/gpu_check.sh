#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for the short times a GPU machine is lent:
#   1. machine and version info,
#   2. a just-in-time build of the keystone extension with its CUDA kernels (verbose log),
#   3. every test marked `gpu` (Triton compiled for the GPU, the CUDA extension, torch.compile),
#      with the reason of every skip reported,
#   4. the GPU benchmarks: `keystone-kernels bench --device cuda --quick` (every DESIGN.md section 5
#      GPU target: 8B optimizer step, 8B weight grad, 1B train steps), the pytest-benchmark suites
#      on CUDA, then the full `bench --device cuda` under a time limit (its JSON is written after
#      every part, so a run cut short keeps what it measured).
# Logs go to $OUT (default ./out): info.txt, build.log, pytest-gpu.log, junit-gpu.xml, status.txt,
# bench-quick.log, bench-pytest.log, bench-full.log and bench/ (bench_cuda_quick.json / .png,
# bench_cuda.json / .png, pytest-benchmark-cuda.json).
# Usage: bash bench/gpu_check.sh [extra pytest args]
#   env: PYTHON, OUT, TORCH_EXTENSIONS_DIR; BENCH=0 skips the benchmarks, BENCH_FULL=0 the full run,
#   BENCH_FULL_TIMEOUT (seconds, default 420) limits it.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${OUT:-$repo/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3
fi
# Keep the build next to the logs' machine, not in a home directory that may not persist.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}
export KEYSTONE_BUILD_CUDA=${KEYSTONE_BUILD_CUDA:-1}  # a GPU check without CUDA kernels is no check
status=0

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$py" -c 'import triton; print("triton", triton.__version__)' 2>&1
  git -C "$repo" rev-parse HEAD 2>/dev/null
} >"$out/info.txt" 2>&1
cat "$out/info.txt"

echo "== building the extension (log: $out/build.log)"
start=$(date +%s)
if "$py" -c '
from keystone_kernels.ops import ext
print("loaded from", ext.load(verbose=True))
assert ext.has_cuda(), "the extension has no CUDA kernels"
' >"$out/build.log" 2>&1; then
  echo "   built in $(( $(date +%s) - start )) s"
else
  echo "   BUILD FAILED after $(( $(date +%s) - start )) s; tail of the log:"
  tail -n 30 "$out/build.log"
  status=1
fi

echo "== pytest -m gpu (log: $out/pytest-gpu.log)"
"$py" -m pytest tests -m gpu -v -rs --durations=15 --junitxml="$out/junit-gpu.xml" "$@" >"$out/pytest-gpu.log" 2>&1
rc=$?
tail -n 25 "$out/pytest-gpu.log"
[ "$rc" -eq 0 ] || status=1
if grep -q "needs a CUDA device" "$out/pytest-gpu.log"; then
  echo "   GPU tests were skipped for lack of a CUDA device: this run checked nothing"
  status=1
fi

if [ "${BENCH:-1}" != "0" ]; then
  mkdir -p "$out/bench"
  echo "== bench --device cuda --quick (log: $out/bench-quick.log)"
  start=$(date +%s)
  "$py" -m keystone_kernels bench --device cuda --quick --out "$out/bench" >"$out/bench-quick.log" 2>&1
  rc=$?
  tail -n 40 "$out/bench-quick.log"
  echo "   rc=$rc in $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || status=1

  echo "== pytest bench -m gpu --benchmark-only (log: $out/bench-pytest.log)"
  "$py" -m pytest bench -m gpu --benchmark-only --benchmark-json="$out/bench/pytest-benchmark-cuda.json" \
    >"$out/bench-pytest.log" 2>&1
  rc=$?
  tail -n 15 "$out/bench-pytest.log"
  [ "$rc" -eq 0 ] || status=1

  if [ "${BENCH_FULL:-1}" != "0" ]; then
    limit=${BENCH_FULL_TIMEOUT:-420}
    echo "== bench --device cuda, full set, at most $limit s (log: $out/bench-full.log)"
    start=$(date +%s)
    timeout --signal=TERM --kill-after=20 "$limit" \
      "$py" -m keystone_kernels bench --device cuda --out "$out/bench" >"$out/bench-full.log" 2>&1
    rc=$?
    tail -n 60 "$out/bench-full.log"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "   cut short after $limit s: $out/bench/bench_cuda.json holds the parts that finished"
    elif [ "$rc" -ne 0 ]; then
      status=1
    fi
    echo "   rc=$rc in $(( $(date +%s) - start )) s"
  fi
fi

echo "status=$status (0: extension built with CUDA, every gpu test passed, the GPU benchmarks ran)" | tee "$out/status.txt"
exit "$status"
