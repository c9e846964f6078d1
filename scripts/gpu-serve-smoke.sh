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
src=$(pwd)
cd /tmp  # run the installed package, not the source tree
python3 -m engine.serve model=llama-3.2-1b +engine.load_format=dummy scheduler.max_model_len=4096 port=8011 \
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
# 2. A real tokenizer (Llama-3's, from npm: scripts/fetch-tokenizers.sh; carry .tok) and the agent-aware
#    policies, one of them Python (cache_credit): chat with text both ways, a session's second turn
#    cached, metrics right after the last request.
if [ -f "$src/.tok/llama3/tokenizer.json" ]; then
  python3 -m engine.serve model=llama-3.2-1b +engine.load_format=dummy scheduler.max_model_len=8192 \
    +engine.tokenizer="$src/.tok/llama3" scheduler.ordering=cache_credit scheduler.eviction=pause_aware port=8012 \
    log_level=warning > "$out/serve2.log" 2>&1 &
  pid=$!
  for _ in $(seq 240); do curl -sf localhost:8012/health >/dev/null && break; sleep 0.5; done
  long=$(python3 -c "print(' '.join(['tool output line']*400))")
  chat='{"model": "llama-3.2-1b", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "session_id": "agent-1", "messages": [{"role": "user", "content": "'"$long"' What is the capital of France?"}]}'
  curl -s localhost:8012/v1/chat/completions -H 'content-type: application/json' -d "$chat" | tee "$out/chat1.json"; echo
  curl -s localhost:8012/v1/chat/completions -H 'content-type: application/json' -d "$chat" | tee "$out/chat2.json"; echo
  curl -s localhost:8012/metrics | grep -E "^tandem_(num_requests_running|kv_cache_used_blocks|prefix_cache_hit_tokens|generation_tokens)" \
    | tee "$out/metrics2.txt"
  kill $pid; wait $pid; echo "server 2 exit status $?"
  tail -5 "$out/serve2.log"
fi
timeout 200 python3 -m experiments.bench_ipc 2>&1 | tail -8 | tee "$out/bench-ipc.txt"
