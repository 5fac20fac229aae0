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
#                   train steps, limit BENCH_FULL_TIMEOUT (default 210 s); its JSON is written after
#                   every part, so a run cut short keeps what it measured
#   4. liger-test   UNTESTED (no GPU run yet): tests/test_lora.py -m gpu, apply_liger_kernel_to_llama()
#                   then patch trains, limit LIGER_TEST_TIMEOUT (default 45 s)
#   5. bench-lora   UNTESTED: the Llama-3.2-1B 4x2048 train step, dense / keystone 0.1% beside PEFT
#                   LoRA r = 8, 16, 64 and (with Liger-Kernel) keystone + Liger, LoRA r=16 + Liger,
#                   limit BENCH_LORA_TIMEOUT (default 110 s) -> bench_cuda_lora.json / .md / .png
#
#   6. hotpath      (not in the default STEPS) bench/gpu_hotpath.py: host syncs, host vs GPU time and kernel
#                   launches per KeystoneAdamW.step(), capturable=False against True, limit HOTPATH_TIMEOUT (25 s)
#   7. profile      (not in the default STEPS) bench/gpu_trainprofile.py: where the Llama-3.2-1B 1 x 512
#                   train step spends its time, dense against keystone and keystone with cuBLAS weight
#                   grads (phases, top kernels, top host ops), limit PROFILE_TIMEOUT (55 s)
#   8. bench-best   (not in the default STEPS) every side at its best, as gpu_check.sh's train step but
#                   with no deadline: every row of 1 x 512 and 4 x 2048, limit BENCH_BEST_TIMEOUT (400 s)
#
# A second command: STEPS="build hotpath profile bench-best" (reuses the build; limits 150 + 480 s at
# most; with the build cached it takes seconds).
#
# Liger-Kernel is not on the GPU machine and it has no network: steps 4 and 5 use it when python can
# import liger_kernel, or when $LIGER_WHEELS (default ./.wheels, ignored by git) holds its wheel,
# made here with `pip download --no-deps liger-kernel -d .wheels` and carried to the machine;
# without it step 4 is skipped and step 5 runs without the Liger rows.
#
# Results in $OUT (default ./out), 5 files at most: summary_full.txt (state of each step, the
# benchmark's tables and targets, the status line), gpu_full_logs.tar.gz (logs, bench_cuda*.json /
# .md / .png, pytest-benchmark-cuda.json, gpu_hotpath.json, trainprofile.json), and bench_cuda.json,
# bench_cuda_lora.json, bench_cuda_best.json and pytest-benchmark-cuda.json. Usage: bash bench/gpu_full.sh   env: PYTHON (default python3), OUT,
# TORCH_EXTENSIONS_DIR, LIGER_WHEELS, STEPS (default "build bench-pytest bench-full liger-test
# bench-lora": a subset runs only those) and the limits above, which add up to 595 s. Exit status 0
# when every step that ran passed (a cut-short bench counts as passed).
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
steps=" ${STEPS:-build bench-pytest bench-full liger-test bench-lora} "
want() { [[ "$steps" == *" $1 "* ]]; }
LAST_RC=0

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

backends=triton,ext
if want build; then
  step build "${BUILD_TIMEOUT:-150}" build.log "$py" -c \
    'from keystone_kernels.ops import ext; print("loaded from", ext.load(verbose=True)); assert ext.has_cuda(), "the extension has no CUDA kernels"'
  [ "$LAST_RC" -eq 0 ] || status=1
  [ "$LAST_RC" -eq 0 ] || backends=triton
fi

if want bench-pytest; then
  step bench-pytest "${BENCH_PYTEST_TIMEOUT:-90}" bench-pytest.log \
    "$py" -m pytest bench -m gpu --benchmark-only -q -p no:cacheprovider --benchmark-json="$logs/bench/pytest-benchmark-cuda.json"
  [ "$LAST_RC" -eq 0 ] || status=1
fi

if want bench-full; then
  step bench-full "${BENCH_FULL_TIMEOUT:-210}" bench-full.log \
    "$py" -m keystone_kernels bench --device cuda --backends "$backends" --lora-ranks none --out "$logs/bench"
  case $LAST_RC in 0|124|137) ;; *) status=1 ;; esac  # cut short by its limit: the JSON holds what finished
fi

# Liger-Kernel: importable already, or installed from a carried wheel into a folder on PYTHONPATH
liger=no
if "$py" -c 'import liger_kernel' >/dev/null 2>&1; then
  liger=yes
else
  wheel=$(ls "${LIGER_WHEELS:-$repo/.wheels}"/liger_kernel-*.whl 2>/dev/null | tail -n 1)
  pylib=$(mktemp -d "${TMPDIR:-/tmp}/gpu_full_pylib.XXXXXX")  # outside $logs: not packed
  if [ -n "$wheel" ] && "$py" -m pip install -q --no-deps --no-index --target "$pylib" "$wheel" >"$logs/liger-install.log" 2>&1; then
    export PYTHONPATH="$pylib:$PYTHONPATH"
    liger=yes
  fi
fi
echo "== Liger-Kernel available: $liger"

if want liger-test; then
  if [ "$liger" = yes ]; then
    step liger-test "${LIGER_TEST_TIMEOUT:-45}" liger-test.log \
      "$py" -m pytest tests/test_lora.py -m gpu -q -p no:cacheprovider -k liger
    [ "$LAST_RC" -eq 0 ] || status=1
  else
    report+=("$(printf '%-13s %5s s  %s' liger-test 0 'SKIPPED: liger_kernel not importable and no wheel in $LIGER_WHEELS')")
  fi
fi

if want bench-lora; then
  liger_flag=()
  [ "$liger" = yes ] && liger_flag=(--liger)
  step bench-lora "${BENCH_LORA_TIMEOUT:-110}" bench-lora.log \
    "$py" -m keystone_kernels bench --device cuda --backends "$backends" --parts train \
      --train-steps llama-3.2-1b:4x2048 --lora-ranks 8,16,64 ${liger_flag[@]+"${liger_flag[@]}"} --name bench_cuda_lora --out "$logs/bench"
  case $LAST_RC in 0|124|137) ;; *) status=1 ;; esac
fi

if want hotpath; then
  step hotpath "${HOTPATH_TIMEOUT:-25}" hotpath.log "$py" bench/gpu_hotpath.py --device cuda --out "$logs/gpu_hotpath.json"
  [ "$LAST_RC" -eq 0 ] || status=1
fi

if want profile; then
  step profile "${PROFILE_TIMEOUT:-55}" trainprofile.log "$py" bench/gpu_trainprofile.py --device cuda \
    --shape llama-3.2-1b --batch 1 --seq 512 --sides dense,keystone,keystone@reference --out "$logs/trainprofile"
  [ "$LAST_RC" -eq 0 ] || status=1
fi

if want bench-best; then
  step bench-best "${BENCH_BEST_TIMEOUT:-400}" bench-best.log \
    "$py" -m keystone_kernels bench --device cuda --backends "$backends" --quick --parts train \
      --train-steps llama-3.2-1b:1x512,llama-3.2-1b:4x2048 --lora-ranks 16 --train-compiled --name bench_cuda_best \
      --out "$logs/bench"
  case $LAST_RC in 0|124|137) ;; *) status=1 ;; esac
fi

{
  echo "gpu_full summary, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( SECONDS - t_start )) s"
  printf '%s\n' "${report[@]}"
  echo "--- bench-full (tables and targets)"
  sed -n '/^machine:/,$p' "$logs/bench-full.log" 2>/dev/null
  echo "--- bench-lora (PEFT LoRA and Liger beside keystone; untested until this runs on a GPU)"
  sed -n '/^machine:/,$p' "$logs/bench-lora.log" 2>/dev/null
  for f in hotpath.log trainprofile.log; do [ -f "$logs/$f" ] && { echo "--- $f"; cat "$logs/$f"; }; done
  echo "--- bench-best (every side at its best)"
  sed -n '/^machine:/,$p' "$logs/bench-best.log" 2>/dev/null
  echo "gpu_full: status=$status (0: every step that ran passed; steps: $steps)"
} >"$out/summary_full.txt"
cp "$out/summary_full.txt" "$logs/"
timeout -k "$grace" 10 tar -czf "$out/gpu_full_logs.tar.gz" -C "$logs" . || status=1
for f in bench/bench_cuda.json bench/bench_cuda_lora.json bench/bench_cuda_best.json bench/pytest-benchmark-cuda.json \
    gpu_hotpath.json trainprofile/trainprofile.json; do
  [ -f "$logs/$f" ] && cp "$logs/$f" "$out/"
done
rm -rf "$logs" ${pylib:+"$pylib"}
cat "$out/summary_full.txt"
exit "$status"
