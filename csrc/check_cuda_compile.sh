#!/usr/bin/env bash
# Compile check of the CUDA sources, no GPU needed (CI):
#   1. every csrc/cuda/*.cu with nvcc -c for each arch in $KEYSTONE_CUDA_ARCHS (default sm_90),
#      warnings as errors;
#   2. the torch binding csrc/cuda/keystone_cuda.cpp with the host compiler, -fsyntax-only,
#      against the torch headers of $PYTHON (a CPU build of torch lacks c10/cuda's generated
#      cmake header; C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it, which is all a syntax check needs).
# Exits non-zero on the first error. Usage: csrc/check_cuda_compile.sh  (env: NVCC, PYTHON, CXX)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nvcc=${NVCC:-$(command -v nvcc || true)}
if [ -z "$nvcc" ]; then
  for cand in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [ -x "$cand" ] && { nvcc=$cand; break; }
  done
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
# The toolkit's headers, for the host-compiler check (nvcc may be a wrapper script elsewhere).
cuda_home=""
for cand in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(readlink -f "$nvcc")")/.." /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ]; then cuda_home=$cand; break; fi
done
archs=${KEYSTONE_CUDA_ARCHS:-sm_90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "check_cuda_compile: $("$nvcc" --version | tail -n 1)"
for arch in $archs; do
  for src in "$here"/cuda/*.cu; do
    echo "  nvcc -arch=$arch -c $(basename "$src")"
    "$nvcc" -std=c++20 -O3 -arch="$arch" -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      -c "$src" -o "$work/$(basename "$src").$arch.o"
  done
done

python=${PYTHON:-python3}
if [ -z "$cuda_home" ]; then
  echo "check_cuda_compile: CUDA headers not found (set CUDA_HOME)" >&2
  exit 2
elif includes=$("$python" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null); then
  echo "  ${CXX:-c++} -fsyntax-only keystone_cuda.cpp (torch headers of $python)"
  # shellcheck disable=SC2086  # $includes is a list of flags
  "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Wno-unused-parameter \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $includes -I"$cuda_home/include" "$here/cuda/keystone_cuda.cpp"
else
  echo "check_cuda_compile: binding check skipped: $python cannot import torch (set PYTHON)" >&2
fi
echo "check_cuda_compile: ok"
