#!/usr/bin/env bash
# The server on a GPU (random-weight Llama-3.2-1B shape), one plain and one streaming request,
# then the IPC benchmark on this machine's idle CPUs. Carry .whl, filled with
# `../shared/tools/device-wheels.sh opentelemetry-api annotated-doc` (FastAPI >= 0.16x needs them; the GPU
# image has neither: without them the gateway cannot import FastAPI there).
set -uo pipefail
out="${OUT:-/tmp/gpu-serve}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
cd /tmp  # run the installed package, not the source tree
python3 -m engine.serve model=llama-3.2-1b +engine.load_format=dummy +engine.max_model_len=4096 port=8011 \
  log_level=warning > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 240); do curl -sf localhost:8011/health >/dev/null && break; sleep 0.5; done
body='{"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true}'
curl -s localhost:8011/v1/completions -H 'content-type: application/json' -d "$body" | tee "$out/plain.json"; echo
curl -sN localhost:8011/v1/completions -H 'content-type: application/json' \
  -d "${body%\}}, \"stream\": true, \"stream_options\": {\"include_usage\": true}}" | tail -3 | tee "$out/stream.txt"
curl -s localhost:8011/metrics | grep -E "^tandem_(num_requests|kv_cache_used|generation_tokens|ipc_token_latency_seconds_(sum|count))" \
  | tee "$out/metrics.txt"
kill $pid; wait $pid; echo "server exit status $?"
tail -5 "$out/serve.log"
timeout 200 python3 -m experiments.bench_ipc 2>&1 | tail -8 | tee "$out/bench-ipc.txt"
