#!/usr/bin/env bash
# The GPU check, sized for ONE call on a lent GPU machine (15 minutes of device time in all, machine
# start included; at most 10 minutes per command; at most 8 files back from $OUT). Every step runs
# under its own time limit (coreutils `timeout`, SIGKILL 2 s after SIGTERM), so the whole check
# ends within the budget printed by the dry run (at most 6 minutes) and never hangs:
#
#   1. info          machine and versions (no CUDA device: the steps after it are skipped)
#   2. build         just-in-time build of the extension with its CUDA kernels, in the background
#   3. tests-triton  meanwhile: pytest -m gpu -k triton -n 8 (the compiled Triton kernels)
#   4. tests-ext     once the build is done: pytest -m gpu -k "not triton" -n 8 (the CUDA extension)
#   5. bench         keystone-kernels bench --device cuda --quick on Llama-3.1-8B shapes: host work per
#                    tensor, optimizer step and weight gradient at 0.1% and 1%, triton and ext
#   6. train         every side at its best (issue 20): the Llama-3.2-1B train step at 1 x 512 and
#                    4 x 2048, 0.1%: dense AMP eager and compiled, dense pure bf16 compiled, keystone
#                    and PEFT LoRA r=16 eager and compiled; 3 warm-up and 10 timed steps, host against
#                    device time per phase. Rows in that order under a deadline inside the step's
#                    limit: what does not fit is noted in the JSON, not run (compiling a 1B model
#                    takes tens of seconds per row)
#   7. pack          the logs into one tar, and the summary
#
# Results in $OUT (default ./out), 4 files: summary.txt (state and seconds of every step, test counts,
# the benchmark tables and targets, the final status line), gpu_check_logs.tar.gz (every log, the junit
# XML, the benchmarks' JSON / md / png), and for quick reading bench_cuda_quick.json and
# bench_cuda_train.json. The full GPU benchmarks (every shape, the pytest-benchmark suites) and the
# hot-path probe and train-step profile are bench/gpu_full.sh, for a second call.
#
# Usage: bash bench/gpu_check.sh            (from anywhere; runs from the repository root)
#   GPU_CHECK_DRY=1  print the steps, their exact commands, time limits and the total budget; run nothing
#   env: PYTHON (default python3: the GPU machine's own, the repository need not be installed),
#        OUT, TORCH_EXTENSIONS_DIR (default <repo>/.torch_extensions, kept between runs)
# Exit status 0 when every step passed, else 1. The last line printed is the status line.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
out=${OUT:-$repo/out}
dry=${GPU_CHECK_DRY:-0}
[ "$dry" = "0" ] && dry=""
grace=2        # seconds between SIGTERM and SIGKILL for a step that overruns its limit
max_budget=360 # seconds: what the limits below must fit, grace included (checked by tests/test_gpu_check.py)

# The repository is not installed on the GPU machine: import it from the checkout.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The build cache inside the repository: the tests and benchmarks load what step 2 built.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}
export KEYSTONE_BUILD_CUDA=1  # a GPU check without the CUDA kernels is no check

if [ -n "$dry" ]; then
  logs="${TMPDIR:-/tmp}/gpu_check.XXXXXX"  # the real run makes a fresh one with mktemp
else
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  # Logs outside $OUT: only the tar and a few files must come back, even from a run cut short.
  logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
fi

# --------------------------------------------------------------------------- the steps

steps=(info build tests-triton tests-ext bench train pack)
# Time limits (seconds). The build runs in the background while the Triton tests run, so only the
# build's limit counts for that stretch; the Triton tests' limit must stay inside it. Measured on an
# H200 with 16 cores (2026-11-27, three runs; the summary records the seconds each step took):
#   info 15       torch import and CUDA init, nvidia-smi: 8-12 s
#   build 95      two C++ files with ATen headers and three plain CUDA files under ninja: 21 s cold;
#                 cached in TORCH_EXTENSIONS_DIR, a rerun takes 6 s
#   triton 95     ~500 tests over 8 workers, mostly Triton JIT compiles: 65 s (85 s with 91 failures)
#   ext 65        ~390 tests over 8 workers: 51-54 s
#   bench 55      bandwidth, the 8B optimizer step and weight grad: 68-75 s with the 1B train step
#                 (dense and keystone, ~12 s each, now in the train step), so ~45 s expected
#   train 113     not measured yet: ~10 s per eager row (a fresh process each), tens of seconds per
#                 compiled one; the deadline (limit - 8 s) leaves time to write the tables
#   pack 5        a tar of ~120 KB: 0 s
declare -A limit=([info]=15 [build]=95 [tests-triton]=95 [tests-ext]=65 [bench]=55 [train]=113 [pack]=5)
declare -A mode=([info]=sequential [build]=background [tests-triton]=concurrent [tests-ext]=sequential
                 [bench]=sequential [train]=sequential [pack]=sequential)
declare -A what=(
  [info]="machine and versions into info.txt; exits 1 without a CUDA device (then every step but pack is skipped)"
  [build]="JIT build of the extension with its CUDA kernels (ninja, verbose log); started in the background"
  [tests-triton]="the gpu tests of the Triton backend, while the build runs (inside the build's ${limit[build]} s)"
  [tests-ext]="after waiting for the build: every other gpu test (the CUDA extension); skipped if the build failed"
  [bench]="host work, Llama-3.1-8B optimizer step + weight grad at 0.1%, 1% (triton, ext); --backends triton if the build failed"
  [train]="Llama-3.2-1B train step at 1x512 and 4x2048: dense, keystone and LoRA r=16, eager and compiled, under a deadline"
  [pack]="tar the logs into \$OUT/gpu_check_logs.tar.gz, write \$OUT/summary.txt, copy the two JSONs"
)

q() { printf '%q' "$1"; }
P=$(q "$py")
L=$(q "$logs")
O=$(q "$out")
info_py='import sys, torch, importlib.util as u; ok = torch.cuda.is_available(); print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda); print({m: (__import__(m).__version__ if u.find_spec(m) else None) for m in ("triton", "transformers")}); print("device", torch.cuda.get_device_name() if ok else "NONE: torch sees no CUDA device"); sys.exit(0 if ok else 1)'
build_py='from keystone_kernels.ops import ext; print("loaded from", ext.load(verbose=True)); assert ext.has_cuda(), "the extension has no CUDA kernels"'
pytest_args="-m gpu -n 8 -q -rfEs --durations=10 -p no:cacheprovider"
bench_args="--device cuda --quick --shapes llama-3.1-8b --parts host,optimizer,wgrad --fractions 0.1%,1%"
train_args="--device cuda --quick --parts train --train-steps llama-3.2-1b:1x512,llama-3.2-1b:4x2048 --lora-ranks 16 --train-compiled --train-deadline $(( limit[train] - 8 )) --name bench_cuda_train"
declare -A cmd=(
  [info]="{ date -u +%Y-%m-%dT%H:%M:%SZ; echo \"cpus \$(nproc)\"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo 'nvidia-smi failed'; nvcc --version | tail -n 1; git rev-parse HEAD; $P -c '$info_py'; } >$L/info.txt 2>&1"
  [build]="$P -c '$build_py' >$L/build.log 2>&1"
  [tests-triton]="$P -m pytest tests $pytest_args -k triton --junitxml=$L/junit-triton.xml >$L/pytest-triton.log 2>&1"
  [tests-ext]="$P -m pytest tests $pytest_args -k 'not triton' --junitxml=$L/junit-ext.xml >$L/pytest-ext.log 2>&1"
  [bench]="$P -m keystone_kernels bench $bench_args --backends triton,ext --out $L/bench >$L/bench.log 2>&1"
  [train]="$P -m keystone_kernels bench $train_args --out $L/bench >$L/train.log 2>&1"
  [pack]="tar -czf $O/gpu_check_logs.tar.gz -C $L ."
)
declare -A log=([info]=info.txt [build]=build.log [tests-triton]=pytest-triton.log [tests-ext]=pytest-ext.log
                [bench]=bench.log [train]=train.log [pack]="")

# The wall-time budget: the limits of the steps in line (a concurrent one runs inside the background
# one), plus the kill grace of each.
budget_steps=()
limits_sum=0
for s in "${steps[@]}"; do
  [ "${mode[$s]}" = concurrent ] && continue
  budget_steps+=("$s")
  limits_sum=$(( limits_sum + limit[$s] ))
done
budget=$(( limits_sum + grace * ${#budget_steps[@]} ))

if [ -n "$dry" ]; then
  echo "gpu_check.sh dry run (GPU_CHECK_DRY=1): nothing is run"
  echo "repo $repo | python $py | results $out | logs $logs (a fresh folder, tarred into the results)"
  echo "env: PYTHONPATH=$PYTHONPATH TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR KEYSTONE_BUILD_CUDA=1"
  echo "each step runs as: timeout -k $grace LIMIT bash -c COMMAND </dev/null"
  i=0
  for s in "${steps[@]}"; do
    i=$(( i + 1 ))
    echo "step $i: $s limit=${limit[$s]}s mode=${mode[$s]}"
    echo "  $ ${cmd[$s]}"
    echo "  # ${what[$s]}"
  done
  echo "budget: $budget s = limits $limits_sum s (${budget_steps[*]}; tests-triton runs inside build) + ${#budget_steps[@]} x $grace s kill grace; at most $max_budget s"
  [ "$budget" -le "$max_budget" ] && [ "${limit[tests-triton]}" -le "${limit[build]}" ]
  exit
fi

# --------------------------------------------------------------------------- running them

declare -A state secs
for s in "${steps[@]}"; do state[$s]="not run"; secs[$s]=0; done
t_start=$SECONDS
build_pid=""

record() {  # step, exit status, seconds
  local s=$1 rc=$2
  secs[$s]=$3
  if [ "$rc" -eq 0 ]; then state[$s]=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state[$s]="TIMEOUT at ${limit[$s]} s"
  else state[$s]="FAILED, exit $rc"
  fi
  echo "   $s: ${state[$s]} in ${secs[$s]} s"
}

run_step() {  # step: run it in the foreground under its limit
  local s=$1 t0=$SECONDS
  echo "== $s (limit ${limit[$s]} s): ${what[$s]}"
  timeout -k "$grace" "${limit[$s]}" bash -c "${cmd[$s]}" </dev/null
  record "$s" $? $(( SECONDS - t0 ))
}

skip() { state[$1]="skipped: $2"; echo "== $1: ${state[$1]}"; }

tail_of() {  # step: the end of its log, for the summary
  [ -n "${log[$1]}" ] && [ -f "$logs/${log[$1]}" ] && tail -n "${2:-15}" "$logs/${log[$1]}" | sed 's/^/    /'
}

pytest_line() {  # pytest log: its final counts line ("381 passed, 2 skipped in 88.1s")
  grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran' "$1" 2>/dev/null | tail -n 1
}

write_summary() {
  local s f
  {
    echo "gpu_check summary, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( SECONDS - t_start )) s of a $budget s budget"
    sed -n '1,12p' "$logs/info.txt" 2>/dev/null | sed 's/^/  /'
    printf '%-13s %7s %6s  %s\n' step seconds limit state
    for s in "${steps[@]}"; do
      printf '%-13s %7s %6s  %s\n' "$s" "${secs[$s]}" "${limit[$s]}" "${state[$s]}"
    done
    for s in tests-triton tests-ext; do
      f=$logs/${log[$s]}
      [ -f "$f" ] && echo "pytest $s: $(pytest_line "$f")"
    done
    for s in "${steps[@]}"; do  # what went wrong, where it did (info above; hotpath and a bench report below)
      case ${state[$s]} in FAILED*|TIMEOUT*) ;; *) continue ;; esac
      [ "$s" = info ] && continue
      case $s in bench|train) grep -q '^machine:' "$logs/${log[$s]}" 2>/dev/null && continue ;; esac
      echo "--- $s: end of ${log[$s]}"
      tail_of "$s" 15
    done
    if grep -q '^machine:' "$logs/bench.log" 2>/dev/null; then
      echo "--- bench (tables and targets; every number in bench_cuda_quick.json)"
      sed -n '/^machine:/,$p' "$logs/bench.log"
    fi
    if [ -f "$logs/train.log" ]; then
      echo "--- train (every side at its best; every number in bench_cuda_train.json)"
      grep -E '^  |^train step' "$logs/train.log"  # the rows as they ran, then the tables
      sed -n '/^machine:/,$p' "$logs/train.log"
    fi
  } >"$out/summary.txt"
}

finished=""
finish() {  # always: stop a build still running, pack, summarize, print the status line
  [ -n "$finished" ] && return
  finished=1
  if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then
    kill -TERM -- "-$build_pid" 2>/dev/null || kill -TERM "$build_pid" 2>/dev/null  # timeout leads its own group
  fi
  write_summary  # first into the logs too, so the tar holds it
  cp "$out/summary.txt" "$logs/summary.txt" 2>/dev/null
  run_step pack
  for f in bench/bench_cuda_quick.json bench/bench_cuda_train.json; do
    [ -f "$logs/$f" ] && cp "$logs/$f" "$out/"
  done
  local failed=() skipped=() s
  for s in "${steps[@]}"; do
    case ${state[$s]} in ok) ;; skipped*) skipped+=("$s") ;; *) failed+=("$s (${state[$s]})") ;; esac
  done
  write_summary
  local line
  if [ ${#failed[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]; then
    line="gpu_check: OK, all ${#steps[@]} steps passed in $(( SECONDS - t_start )) s (budget $budget s); results in $out"
  else
    line="gpu_check: FAILED: ${failed[*]:-no step failed}; skipped: ${skipped[*]:-none}; after $(( SECONDS - t_start )) s (budget $budget s); results in $out"
  fi
  echo "$line" >>"$out/summary.txt"
  echo
  cat "$out/summary.txt"  # ends with the status line
  rm -rf "$logs"
  [ ${#failed[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]
}
trap 'finish; exit $?' EXIT
trap 'echo "interrupted"; exit 130' INT TERM

echo "gpu_check: logs in $logs, results in $out, budget $budget s"
run_step info
cat "$logs/info.txt"
if [ "${state[info]}" != ok ]; then
  for s in build tests-triton tests-ext bench train; do skip "$s" "the info step failed (no CUDA device?)"; done
  exit 1
fi

echo "== build (limit ${limit[build]} s, background): ${what[build]}"
build_epoch=$(date +%s)
timeout -k "$grace" "${limit[build]}" bash -c "${cmd[build]}" </dev/null &
build_pid=$!
state[build]=running

run_step tests-triton

wait "$build_pid"
build_rc=$?
build_pid=""
# The build's own duration: its log is written until it ends (waiting here may come much later).
build_end=$(stat -c %Y "$logs/build.log" 2>/dev/null || date +%s)
record build "$build_rc" $(( build_end - build_epoch ))
if [ "$build_rc" -ne 0 ]; then
  tail -n 20 "$logs/build.log" 2>/dev/null
  # A build killed by its limit leaves torch's lock file behind, and the next load would wait on it.
  rm -f "$TORCH_EXTENSIONS_DIR"/*/keystone_ext_cuda/lock
  skip tests-ext "the extension did not build"
  cmd[bench]=${cmd[bench]/--backends triton,ext/--backends triton}
  cmd[train]="${cmd[train]/--quick/--quick --backends triton}"
else
  run_step tests-ext
fi

run_step bench
run_step train
exit 0  # the EXIT trap packs, summarizes and sets the status
