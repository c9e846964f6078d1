#!/usr/bin/env bash
# The twin on a GPU machine, from the repo root (the device tool runs it there; carry .whl, filled by
# `../shared/tools/device-wheels.sh opentelemetry-api annotated-doc prometheus-client`):
#
#   scripts/gpu-twin.sh calibrate [args]   python -m experiments.calibrate: the profile and its fit,
#                                          conf/profiles/<hardware>/<model>.json
#   scripts/gpu-twin.sh fidelity [args]    python -m experiments.fidelity (Hydra overrides): docs/fidelity.md
#   scripts/gpu-twin.sh start-fidelity [args]   the same in the background (a new process session), then
#                                          follows it for up to $FOLLOW_S seconds (default 540)
#   scripts/gpu-twin.sh follow             follows a background run to its end
#
# Each installs the project into the machine's own python3 once (wheels to /tmp/site, then
# `pip install .`), runs the installed package (PYTHONSAFEPATH: the source tree's controlplane/ has
# no compiled _core), and copies what it wrote to $OUT (or /tmp/gpu-twin). A background run outlives
# one device call while the machine stays held: call `follow` again within the machine's idle time.
set -uo pipefail
what="${1:-}"; shift || true
out="${OUT:-/tmp/gpu-twin}"; mkdir -p "$out"
state=/tmp/gpu-twin-state; mkdir -p "$state"
repo=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TANDEM_CONF_DIR="$repo/conf"

install() {
  [ -f "$state/installed" ] && [ "$(cat "$state/installed")" = "$(git -C "$repo" rev-parse HEAD 2>/dev/null)$(ls -l "$repo"/csrc | md5sum)" ] && return 0
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
  echo "$(git -C "$repo" rev-parse HEAD 2>/dev/null)$(ls -l "$repo"/csrc | md5sum)" > "$state/installed"
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# The report, its plots and results.json go to $state/fidelity (outside the tree the next call re-sends).
fidelity_args="report=$state/fidelity/fidelity.md plots_dir=$state/fidelity out_dir=$state/fidelity"
collect_fidelity() {
  cp "$state"/fidelity/*.* "$state/fidelity.log" "$out"/ 2>/dev/null
  ls -la "$out"
}

follow() {
  local limit="${FOLLOW_S:-540}" start=$SECONDS
  while [ ! -f "$state/fidelity.done" ]; do
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "--- still running after ${limit} s: call '$0 follow' again"; tail -5 "$state/fidelity.log"; return 3
    fi
    sleep 5
  done
  tail -60 "$state/fidelity.log"
  collect_fidelity
  return "$(cat "$state/fidelity.done")"
}

case "$what" in
  calibrate)
    install
    python3 -m experiments.calibrate "$@" 2>&1 | tee "$out/calibrate.log"
    status=${PIPESTATUS[0]}
    cp outputs/calibrate/*/*.csv "$out"/ 2>/dev/null
    cp conf/profiles/*/*.json "$out"/ 2>/dev/null
    exit "$status"
    ;;
  fidelity)
    install
    python3 -m experiments.fidelity --config-path "$repo/conf" $fidelity_args "$@" 2>&1 | tee "$state/fidelity.log"
    status=${PIPESTATUS[0]}
    collect_fidelity
    exit "$status"
    ;;
  start-fidelity)
    install
    rm -f "$state/fidelity.done"
    setsid bash -c "python3 -m experiments.fidelity --config-path '$repo/conf' $fidelity_args $* > '$state/fidelity.log' 2>&1; \
                    echo \$? > '$state/fidelity.done'" < /dev/null &
    follow
    ;;
  follow)
    follow
    ;;
  *)
    echo "usage: $0 calibrate|fidelity|start-fidelity|follow [args]"; exit 2
    ;;
esac
