#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for the short times a GPU machine is lent:
#   1. machine and version info,
#   2. a just-in-time build of the keystone extension with its CUDA kernels (verbose log),
#   3. every test marked `gpu` (Triton compiled for the GPU, the CUDA extension, torch.compile),
#      with the reason of every skip reported.
# Logs go to $OUT (default ./out): info.txt, build.log, pytest-gpu.log, junit-gpu.xml, status.txt.
# Usage: bash bench/gpu_check.sh [extra pytest args]   (env: PYTHON, OUT, TORCH_EXTENSIONS_DIR)
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

echo "status=$status (0: extension built with CUDA and every gpu test passed)" | tee "$out/status.txt"
exit "$status"
