#!/usr/bin/env bash
# The agentic path's GPU check and figures (issue #15), phases in one device call (run from the repo root):
#   scripts/gpu-agentic.sh tune|bench|tests|served ...     e.g.  scripts/gpu-agentic.sh tune bench
#     tune    python -m experiments.tune_attention $TUNE_ARGS (tile sweeps; needs no build)
#     kernels the Triton kernels' GPU tests against the torch reference (a part of make test-gpu)
#     gemv    python -m experiments.tune_fp8_gemv $GEMV_ARGS (the FP8 decode GEMV's tile sweep)
#     fuse    python -m experiments.tune_gemv $FUSE_ARGS (the fused one-row GEMV against what it replaces)
#     profile python -m experiments.profile_decode, the 8B shape then $PROFILE_MODEL (llama-3.2-1b): a b1 step's kernels
#     bench   python -m experiments.bench_engine on the 8B shape: decode b1/b4/b64, prefill, a later turn
#     tests   make test-gpu (TESTS_ARGS: more pytest arguments, e.g. test files: a part of it)
#     served  python -m experiments.bench_agentic (swe_smith served at concurrency 1, 2, 4 beside the twin)
#     floor   bench_agentic at concurrency $FLOOR_CONC (1 2 4 8), one wave, beside the twin on the shipped profile,
#             with $FLOOR_ARGS (e.g. --admission tps_floor:tok_s=70); files floor-$FLOOR_TAG.* (issue #21)
#     attn    the fused decode attention (rotary + KV write in the kernel: the default): its GPU tests, then
#             bench_engine bf16 / bf16-composed / bf16-attn / fp8w / fp8w-composed / fp8w-attn at decode b1 512
#             and 50K, b4 50K (ATTN_S seconds; ATTN_VARIANTS overrides the variants)
#     fused   python -m experiments.tune_attention --only decode-fused: the fused decode attention's kernels
#             and tiles at b1 512 / 50K, b4 50K, b64 512, bf16 and FP8 caches, with registers (FUSED_S)
#     cudnn   long prefill chunks on cuDNN (engine/kernels/cudnn_prompt.py): its GPU tests, then bench_engine
#             bf16-triton (the route off) / bf16 at prefill 16K / 32K / 50K and a turn, then
#             tune_attention --only prompt-cudnn (CUDNN_S seconds each)
#     chunks  bench_engine bf16 at prefill 32K / 50K with each idle_chunk_size of $CHUNKS (16384 32768 65536:
#             a lone prompt's chunk), $CHUNKS_ARGS more (e.g. --profile-gpu), CHUNKS_S seconds each
#     lookahead  python -m experiments.bench_lookahead --engine-only: the engine's step time with and without
# Carry .whl (../shared/tools/device-wheels.sh prometheus-client opentelemetry-api annotated-doc: fastapi
# 0.165 imports the last two) for simpy/hydra/fastapi. Logs go to $OUT (or /tmp/gpu-agentic).
# Each phase has its own time limit (TUNE_S, KERNELS_S, GEMV_S, FUSE_S, PROFILE_S, BENCH_S, TESTS_S, SERVED_S, FLOOR_S, LOOKAHEAD_S,
# ATTN_S, CUDNN_S, CHUNKS_S seconds) so that what ran comes back.
set -uo pipefail
out="${OUT:-/tmp/gpu-agentic}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
# an exported tree (git archive HEAD into an untracked folder) names its commit in COMMIT; a checkout asks git
if [ -f COMMIT ]; then cp COMMIT "$out/commit.txt"
else git rev-parse --short HEAD > "$out/commit.txt" 2>/dev/null; git status --short >> "$out/commit.txt" 2>/dev/null; fi
installed=0
install() {
  [ $installed = 1 ] && return 0
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-build-isolation --no-deps . > "$out/install.txt" 2>&1 || { tail -20 "$out/install.txt"; return 1; }
  installed=1
}
status=0
for phase in "$@"; do
  case "$phase" in
    tune) timeout "${TUNE_S:-300}" python3 -m experiments.tune_attention ${TUNE_ARGS:-} > "$out/tune.txt" 2> "$out/tune.err" \
      || status=1 ;;
    kernels) install || exit 1
      PYTHONSAFEPATH=1 timeout "${KERNELS_S:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
        tests/test_kernels_triton.py tests/test_kernels_fused.py tests/test_attention_agentic_gpu.py tests/test_fp8_kv.py tests/test_fp8_weights.py tests/test_decode_fma.py \
        > "$out/kernels-gpu.txt" 2>&1 || status=1 ;;
    gemv) install || exit 1
      PYTHONSAFEPATH=1 timeout "${GEMV_S:-240}" python3 -m experiments.tune_fp8_gemv ${GEMV_ARGS:-} > "$out/gemv.txt" 2>&1 \
        || status=1 ;;
    fuse) install || exit 1
      PYTHONSAFEPATH=1 timeout "${FUSE_S:-240}" python3 -m experiments.tune_gemv ${FUSE_ARGS:-} > "$out/fuse.txt" 2>&1 \
        || status=1 ;;
    profile) install || exit 1
      for m in llama-3.1-8b ${PROFILE_MODEL:-llama-3.2-1b}; do
        PYTHONSAFEPATH=1 timeout "${PROFILE_S:-120}" python3 -m experiments.profile_decode --model "$m" >> "$out/profile.txt" 2>&1 \
          || status=1
      done ;;
    bench) install || exit 1
      PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$PWD/conf timeout "${BENCH_S:-300}" python3 -m experiments.bench_engine --models llama-3.1-8b --no-hf ${BENCH_ARGS:-} \
        --json "$out/bench-engine.json" > "$out/bench-engine.txt" 2>&1 || status=1 ;;
    tests) install || exit 1
      timeout "${TESTS_S:-300}" make test-gpu PYTEST_ARGS="-v ${TESTS_ARGS:-}" > "$out/test-gpu.txt" 2>&1 || status=1 ;;
    served) install || exit 1
      export TANDEM_CONF_DIR=$PWD/conf
      PYTHONSAFEPATH=1 timeout "${SERVED_S:-330}" python3 -m experiments.bench_agentic --json "$out/bench-agentic.json" \
        --out /tmp/bench_agentic > "$out/bench-agentic.txt" 2>&1 || status=1 ;;
    floor) install || exit 1
      export TANDEM_CONF_DIR=$PWD/conf
      PYTHONSAFEPATH=1 timeout "${FLOOR_S:-330}" python3 -m experiments.bench_agentic --concurrency ${FLOOR_CONC:-1 2 4 8} \
        --waves 1 --twin-cost profile ${FLOOR_ARGS:-} --json "$out/floor-${FLOOR_TAG:-all}.json" --out /tmp/bench_floor \
        > "$out/floor-${FLOOR_TAG:-all}.txt" 2>&1 || status=1 ;;
    lookahead) install || exit 1
      PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$PWD/conf timeout "${LOOKAHEAD_S:-240}" python3 -m experiments.bench_lookahead \
        --engine-only --json "$out/lookahead.json" > "$out/lookahead.txt" 2>&1 || status=1 ;;
    attn) install || exit 1
      PYTHONSAFEPATH=1 timeout "${ATTN_S:-400}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
          tests/test_kernels_triton.py -k "rotary_decode or fused_decode or decode" > "$out/attn.txt" 2>&1 || status=1
      PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$PWD/conf timeout "${ATTN_S:-400}" python3 -m experiments.bench_engine \
          --models llama-3.1-8b --no-hf --variants ${ATTN_VARIANTS:-bf16 bf16-composed bf16-attn fp8w fp8w-composed fp8w-attn} \
          --decode 1x512 1x50000 4x50000 --prefill 2048 --turn >> "$out/attn.txt" 2>&1 || status=1 ;;
    cudnn) install || exit 1
      PYTHONSAFEPATH=1 timeout "${CUDNN_S:-200}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
          tests/test_attention_agentic_gpu.py tests/test_kernels_triton.py -k "cudnn" > "$out/cudnn.txt" 2>&1 || status=1
      PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$PWD/conf timeout "${CUDNN_S:-200}" python3 -m experiments.bench_engine \
          --models llama-3.1-8b --no-hf --variants bf16-triton bf16 --decode 1x512 --prefill 16384 32768 50000 \
          >> "$out/cudnn.txt" 2>&1 || status=1
      PYTHONSAFEPATH=1 timeout "${CUDNN_S:-200}" python3 -m experiments.tune_attention --only prompt-cudnn \
          >> "$out/cudnn.txt" 2>&1 || status=1 ;;
    chunks) install || exit 1
      for c in ${CHUNKS:-16384 32768 65536}; do
        PYTHONSAFEPATH=1 TANDEM_CONF_DIR=$PWD/conf timeout "${CHUNKS_S:-200}" python3 -m experiments.bench_engine \
            --models llama-3.1-8b --no-hf --variants ${CHUNKS_VARIANTS:-bf16} --decode 1x512 --prefill 32768 50000 \
            --idle-chunk "$c" ${CHUNKS_ARGS:-} >> "$out/chunks.txt" 2>&1 || status=1
      done ;;
    fused) install || exit 1
      PYTHONSAFEPATH=1 timeout "${FUSED_S:-300}" python3 -m experiments.tune_attention --only decode-fused \
        --shapes ${FUSED_SHAPES:-1x512 1x50000 4x50000 64x512} > "$out/fused.txt" 2>&1 || status=1 ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  echo "phase $phase done (status so far $status)"
done
exit $status
