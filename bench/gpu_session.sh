#!/usr/bin/env bash
# One call on a lent GPU machine (minutes of device time in all, no network): build fastcnn for this
# GPU only, run the CUDA-marked tests, then the benchmarks, all inside one deadline so that whatever
# finished comes back. Each step gets min(its budget, time left); a step that runs out is killed and
# the next one starts.
#
#   bench/gpu_session.sh OUTDIR [SECONDS] [REVISION]
#
# Writes OUTDIR/session.log (everything), OUTDIR/build.log, OUTDIR/pytest.xml and
# OUTDIR/results.tar.gz (bench/results/cuda-<gpu>/ as the benchmarks left it, with the per-kernel
# breakdown of bench/profile_kernels.py from the "profile" step).
# GPU_SESSION_STEPS (default "build test bench profile models") picks steps; GPU_SESSION_PYTEST
# adds pytest args. "models" (MobileNet v1 and the STN classifier end to end, fp32) comes last, so
# it only gets the time the others left.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_session.sh OUTDIR [SECONDS] [REVISION]}"
deadline=$(( $(date +%s) + ${2:-480} ))
revision="${3:-unknown}"
steps="${GPU_SESSION_STEPS:-build test bench profile models}"
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1
export PYTHONUNBUFFERED=1

left() { echo $(( deadline - $(date +%s) )); }
# step BUDGET command...: runs the command under min(BUDGET, time left) seconds.
step() {
  local budget=$1; shift
  local t; t=$(left)
  (( t < budget )) && budget=$t
  if (( budget < 20 )); then echo "== skipped, ${budget}s left: $*"; return 124; fi
  echo "== $(date +%T) $* (budget ${budget}s)"
  local start; start=$(date +%s)
  timeout -k 5 "$budget" "$@"
  local rc=$?
  echo "== rc=$rc after $(( $(date +%s) - start )) s"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv
python3 -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0),
  torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
results="bench/results/cuda-$gpu"

if [[ " $steps " == *" build "* ]]; then
  # Only this GPU's architecture: half the compile time of the default 8.0;9.0.
  TORCH_CUDA_ARCH_LIST="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")" \
  FASTCNN_CUDA=1 MAX_JOBS="$(nproc)" \
    step 300 python3 -m pip install -v --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
  rc=$?
  grep -E "fastcnn build configuration|ptxas|error" -A3 "$out/build.log" | head -40
  if (( rc != 0 )); then tail -n 40 "$out/build.log"; echo "== build failed"; exit 1; fi
  # _C must use the shared libstdc++ that torch uses (see setup.py): a private static copy
  # crashed every C++ error message with a number in it on the first H200 session.
  readelf -d fastcnn/_C*.so 2>/dev/null | grep -E "NEEDED.*(libstdc|libc10)" || true
  python3 -m fastcnn info || exit 1
fi

if [[ " $steps " == *" test "* ]]; then
  # xdist: the tests compile Triton kernels; workers share Triton's on-disk cache.
  step 200 python3 -m pytest -m cuda -q -n 12 --timeout 150 -p no:cacheprovider -rfE \
    --junitxml="$out/pytest.xml" ${GPU_SESSION_PYTEST:-}
fi

if [[ " $steps " == *" bench "* ]]; then
  for dtype in float32 float16; do
    for op in depthwise grid_sample; do
      FASTCNN_GIT_REVISION="$revision" step 150 python3 -m fastcnn bench --op "$op" --device cuda \
        --dtype "$dtype" --rounds 7 --min-time 0.005 --max-time 3 --out "$results"
    done
  done
fi

if [[ " $steps " == *" profile "* ]]; then
  for dtype in float32 float16; do
    step 90 python3 bench/profile_kernels.py --device cuda --dtype "$dtype" --out "$results" >/dev/null
  done
fi
if [[ " $steps " == *" models "* ]]; then
  FASTCNN_GIT_REVISION="$revision" step 120 python3 -m fastcnn bench --op models --device cuda \
    --rounds 7 --min-time 0.005 --max-time 5 --out "$results"
fi

if [[ " $steps " == *" bench "* || " $steps " == *" profile "* || " $steps " == *" models "* ]]; then
  tar czf "$out/results.tar.gz" "$results" 2>/dev/null && echo "== results in $out/results.tar.gz"
fi
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
echo "== done, $(left) s of the deadline left"
