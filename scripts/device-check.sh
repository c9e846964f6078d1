#!/usr/bin/env bash
# One full check on a GPU machine (run from the repo root; the device tool runs it there).
# Installs the project into the machine's own python3 (no network needed: the GPU image has
# scikit-build-core, pybind11, cmake, numpy, pytest, hypothesis, torch), then runs the GPU
# tests and the whole CPU suite against that install. Logs go to $OUT when it is set.
set -uo pipefail
out="${OUT:-/tmp/device-check}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
env | grep -iE "^(LDFLAGS|CXXFLAGS|CFLAGS|CMAKE_[A-Z_]*)=" | tee -a "$out/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5 || exit 1
ldd "$(PYTHONSAFEPATH=1 python3 -c "import controlplane._core as c; print(c.__file__)")" | tee -a "$out/gpu.txt"
status=0
make test-gpu PYTEST_ARGS="-v" 2>&1 | tee "$out/test-gpu.txt" || status=1
PYTHONSAFEPATH=1 TANDEM_HYPOTHESIS_EXAMPLES=200 python3 -m pytest -q -ra > "$out/test-all.txt" 2>&1 || status=1
tail -5 "$out/test-all.txt"
exit $status
