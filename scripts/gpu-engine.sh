#!/usr/bin/env bash
# The engine's GPU check and measurements in one device call (run from the repo root):
#   scripts/gpu-engine.sh [tests|bench|all] [extra pytest args...]
# Installs the project into the machine's own python3 (carry .whl from ../shared/tools/device-wheels.sh
# for simpy/hydra, which the CPU parts of the package import), runs `make test-gpu`, then the kernel
# and engine benchmarks. Logs go to $OUT (or /tmp/gpu-engine).
set -uo pipefail
what="${1:-all}"; shift || true
out="${OUT:-/tmp/gpu-engine}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3 || exit 1
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 420 make test-gpu PYTEST_ARGS="-v -s $*" 2>&1 | tee "$out/test-gpu.txt" || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  PYTHONSAFEPATH=1 timeout 200 python3 -m experiments.bench_kernels 2>&1 | tee "$out/bench-kernels.txt" || status=1
  PYTHONSAFEPATH=1 timeout 400 python3 -m experiments.bench_engine --json "$out/bench-engine.json" 2>&1 \
    | tee "$out/bench-engine.txt" || status=1
fi
exit $status
