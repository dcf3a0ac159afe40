#!/usr/bin/env bash
# One entry point for a fresh machine: sets up a virtual environment with a CUDA build of torch,
# builds fastcnn (CUDA sources included when a toolkit is found), then runs what was asked.
#
#   ./dev.sh bench [fastcnn bench options]   the main job: benchmarks against PyTorch, table + JSON + PNG
#   ./dev.sh test  [pytest options]          the test suite (what .ci/run runs)
#
# Environment: FASTCNN_VENV (default .venv), TORCH_SPEC (default torch==2.14.1),
# FASTCNN_CUDA (1 forces CUDA sources, 0 leaves them out), TORCH_CUDA_ARCH_LIST (default 8.0;9.0).
set -euo pipefail
cd "$(dirname "$0")"

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  bench|test) ;;
  *) echo "usage: ./dev.sh bench|test [args...]" >&2; exit 2 ;;
esac

venv="${FASTCNN_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv" >&2
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "== installing ${TORCH_SPEC:-torch==2.14.1}" >&2
  "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.14.1}"
fi
"$py" -m pip install --quiet setuptools wheel ninja

# CUDA_HOME must be the toolkit root (bin/nvcc and include/). The nvcc on PATH may be a wrapper
# script, so follow it to the real binary.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$(readlink -f "$(command -v nvcc)")"
  if [ ! -f "$(dirname "$nvcc_bin")/../include/cuda.h" ]; then
    nvcc_bin="$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc_bin" | head -n 1 || true)"
  fi
  if [ -n "$nvcc_bin" ] && [ -f "$(dirname "$nvcc_bin")/../include/cuda.h" ]; then
    CUDA_HOME="$(cd "$(dirname "$nvcc_bin")/.." && pwd)"
    export CUDA_HOME
  fi
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
# Each nvcc/cc1plus process on torch's headers takes 1-2 GB.
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "== building fastcnn (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" >&2
extras=test
[ "$command" = bench ] && extras=bench
# --no-build-isolation: compile against the torch installed above (an isolated build would use
# another torch and fail at import with undefined symbols).
"$py" -m pip install -v --no-build-isolation -e ".[$extras]" >"$venv/build.log" 2>&1 || {
  tail -n 60 "$venv/build.log" >&2
  echo "== build failed; full log in $venv/build.log" >&2
  exit 1
}
grep -A6 "fastcnn build configuration" "$venv/build.log" >&2 || true

case "$command" in
  bench) exec "$venv/bin/fastcnn" bench "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
esac
