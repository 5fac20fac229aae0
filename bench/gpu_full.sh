#!/usr/bin/env bash
# The full GPU benchmarks, for a second call on a lent GPU machine (bench/gpu_check.sh is the short
# check: build, GPU tests, a focused benchmark and the hot-path probe). Sized for one command of at
# most 10 minutes; every step under its own time limit (SIGKILL 2 s after SIGTERM):
#
#   1. build        the extension with its CUDA kernels (reused from $TORCH_EXTENSIONS_DIR when the
#                   machine already built it), limit BUILD_TIMEOUT (default 150 s)
#   2. bench-pytest the pytest-benchmark suites on CUDA: pytest bench -m gpu --benchmark-only,
#                   limit BENCH_PYTEST_TIMEOUT (default 120 s)
#   3. bench-full   keystone-kernels bench --device cuda, every shape, fraction and backend, and the
#                   train steps, limit BENCH_FULL_TIMEOUT (default 300 s); its JSON is written after
#                   every part, so a run cut short keeps what it measured
#
# Results in $OUT (default ./out), 4 files at most: summary_full.txt (state of each step, the
# benchmark's tables and targets, the status line), gpu_full_logs.tar.gz (logs, bench_cuda.json /
# .md / .png, pytest-benchmark-cuda.json), and bench_cuda.json and pytest-benchmark-cuda.json.
# Usage: bash bench/gpu_full.sh   env: PYTHON (default python3), OUT, TORCH_EXTENSIONS_DIR, and the
# three limits above. Exit status 0 when every step passed (a cut-short full bench counts as passed).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
out=${OUT:-$repo/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_full.XXXXXX")  # outside $OUT: only the tar and a few files come back
mkdir -p "$logs/bench"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the repository is not installed on the GPU machine
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}
export KEYSTONE_BUILD_CUDA=1
grace=2
t_start=$SECONDS
status=0
report=()

step() {  # name, limit, log file, command...: run it under its limit, note its state
  local name=$1 limit=$2 logf=$3 t0=$SECONDS rc state
  shift 3
  echo "== $name (limit $limit s, log $logf)"
  timeout -k "$grace" "$limit" "$@" </dev/null >"$logs/$logf" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then state=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state="TIMEOUT at $limit s"
  else state="FAILED, exit $rc"
  fi
  report+=("$(printf '%-13s %5s s  %s' "$name" $(( SECONDS - t0 )) "$state")")
  echo "   $name: $state in $(( SECONDS - t0 )) s"
  [ "$state" = ok ] || tail -n 15 "$logs/$logf"
  LAST_RC=$rc
}

step build "${BUILD_TIMEOUT:-150}" build.log "$py" -c \
  'from keystone_kernels.ops import ext; print("loaded from", ext.load(verbose=True)); assert ext.has_cuda(), "the extension has no CUDA kernels"'
[ "$LAST_RC" -eq 0 ] || status=1
backends=triton,ext
[ "$LAST_RC" -eq 0 ] || backends=triton

step bench-pytest "${BENCH_PYTEST_TIMEOUT:-120}" bench-pytest.log \
  "$py" -m pytest bench -m gpu --benchmark-only -q -p no:cacheprovider --benchmark-json="$logs/bench/pytest-benchmark-cuda.json"
[ "$LAST_RC" -eq 0 ] || status=1

step bench-full "${BENCH_FULL_TIMEOUT:-300}" bench-full.log \
  "$py" -m keystone_kernels bench --device cuda --backends "$backends" --out "$logs/bench"
case $LAST_RC in 0|124|137) ;; *) status=1 ;; esac  # cut short by its limit: the JSON holds what finished

{
  echo "gpu_full summary, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( SECONDS - t_start )) s"
  printf '%s\n' "${report[@]}"
  echo "--- bench-full (tables and targets)"
  sed -n '/^machine:/,$p' "$logs/bench-full.log"
  echo "gpu_full: status=$status (0: built with CUDA, the pytest-benchmark suites and the full bench ran)"
} >"$out/summary_full.txt"
cp "$out/summary_full.txt" "$logs/"
timeout -k "$grace" 10 tar -czf "$out/gpu_full_logs.tar.gz" -C "$logs" . || status=1
for f in bench/bench_cuda.json bench/pytest-benchmark-cuda.json; do
  [ -f "$logs/$f" ] && cp "$logs/$f" "$out/"
done
rm -rf "$logs"
cat "$out/summary_full.txt"
exit "$status"
