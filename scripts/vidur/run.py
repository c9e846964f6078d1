"""Time Vidur 0.0.26 on one fixed-length synthetic workload and print VIDUR_JSON.

Run it with the Python of a venv that has ``vidur==0.0.26`` installed::

    .vidur/bin/python scripts/vidur/run.py --requests 3000 --prefill 2048 \
        --decode 512 --qps 5 --cache-dir /tmp/vidur-cache [--scheduler sarathi|vllm]

What it does, in one process:

1. writes the synthetic H100 profiling data (``profiles.py``) into
   ``--cache-dir`` if it is not there yet, and sets ``HF_HUB_OFFLINE=1`` so
   Vidur resolves it from that local hub cache;
2. builds the same ``SimulationConfig`` that ``python -m vidur.main`` would
   build from the equivalent flags: Llama-3-8B, one H100 replica (TP 1, PP 1),
   random-forest execution-time predictor with a one-point hyper-parameter
   grid (100 trees, depth 16, 2-fold CV, one thread) and a prediction table
   sized to the request length, Poisson arrivals, fixed prefill/decode lengths,
   Sarathi (chunk 512 by default) or vLLM scheduling; plots and traces off,
   metrics into a temporary directory that is removed afterwards;
3. runs the simulator and times it from outside: ``wall_s`` is everything
   since this script started (imports of numpy/pandas/sklearn/vidur, predictor
   training or cache load, request generation, event loop, metrics output;
   only interpreter start-up and stdlib imports come before the clock) and
   ``event_loop_s`` is the event loop alone. Vidur itself is not modified; the
   loop end is taken from a subclass hook on ``Simulator._write_output``.

The first run for a given predictor configuration trains the models and
caches them (and the prediction tables) in ``--cache-dir``; later runs load
them. The last line on stdout is ``VIDUR_JSON {...}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

    from vidur.config import SimulationConfig

# Only the stdlib is imported above; numpy, pandas, sklearn and vidur are
# imported inside main(), after this mark, so their import time is counted.
T_START = time.perf_counter()

MODEL_NAME = "meta-llama/Llama-3-8B"  # Vidur 0.0.26's spelling
KV_GRANULARITY = 256  # Vidur's default kv_cache_prediction_granularity
VLLM_MIN_BATCH_TOKENS = 4096  # Vidur's default vLLM max_tokens_in_batch


def import_profiles() -> ModuleType:
    """Set the offline/threading environment, then import the sibling profiles.py."""
    # Must happen before huggingface_hub / numpy are first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("WANDB_MODE", "disabled")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module("profiles")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, k: int) -> int:
    """Round ``n`` up to a multiple of ``k``."""
    return (n + k - 1) // k * k


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description="Time Vidur 0.0.26 on a fixed-length workload.")
    ap.add_argument("--requests", type=int, required=True, help="number of requests")
    ap.add_argument("--prefill", type=int, required=True, help="prefill tokens per request")
    ap.add_argument("--decode", type=int, required=True, help="decode tokens per request")
    ap.add_argument("--qps", type=float, required=True, help="Poisson arrival rate")
    ap.add_argument("--cache-dir", type=Path, required=True, help="profiles + trained models")
    ap.add_argument("--scheduler", choices=("sarathi", "vllm"), default="sarathi")
    ap.add_argument("--chunk-size", type=int, default=512, help="Sarathi chunk size")
    ap.add_argument("--batch-size-cap", type=int, default=128)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="per-request KV reservation for memory planning (default prefill+decode)",
    )
    ap.add_argument("--seed", type=int, default=42)
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace, metrics_dir: str) -> SimulationConfig:
    """Build the SimulationConfig ``vidur.main`` would make from equivalent flags."""
    from vidur import config as vc

    request_tokens = args.prefill + args.decode
    max_tokens = args.max_tokens or request_tokens
    if args.scheduler == "sarathi":
        batch_tokens = args.chunk_size
        scheduler = vc.SarathiSchedulerConfig(chunk_size=args.chunk_size, batch_size_cap=args.batch_size_cap)
    else:
        # vLLM prefills a request in one iteration, so the batch budget must fit it.
        batch_tokens = max(VLLM_MIN_BATCH_TOKENS, args.prefill)
        scheduler = vc.VllmSchedulerConfig(max_tokens_in_batch=batch_tokens, batch_size_cap=args.batch_size_cap)
    # Prediction tables only need to cover what the run can look up: per-batch
    # token counts and (granularity-rounded) KV lengths of one request.
    table_tokens = next_pow2(max(round_up(request_tokens, KV_GRANULARITY), batch_tokens))
    predictor = vc.RandomForrestExecutionTimePredictorConfig(
        cache_dir=str(args.cache_dir),
        prediction_max_tokens_per_request=table_tokens,
        prediction_max_batch_size=args.batch_size_cap,
        prediction_max_prefill_chunk_size=round_up(batch_tokens, 32),
        num_estimators=[100],
        max_depth=[16],
        min_samples_split=[2],
        k_fold_cv_splits=2,
        num_training_job_threads=1,
    )
    length = vc.FixedRequestLengthGeneratorConfig(
        seed=args.seed,
        prefill_tokens=args.prefill,
        decode_tokens=args.decode,
        max_tokens=max_tokens,
    )
    interval = vc.PoissonRequestIntervalGeneratorConfig(seed=args.seed, qps=args.qps)
    requests = vc.SyntheticRequestGeneratorConfig(
        seed=args.seed,
        length_generator_config=length,
        interval_generator_config=interval,
        num_requests=args.requests,
    )
    replica = vc.ReplicaConfig(
        model_name=MODEL_NAME,
        device="h100",
        network_device="h100_dgx",
        tensor_parallel_size=1,
        num_pipeline_stages=1,
    )
    cluster = vc.ClusterConfig(
        num_replicas=1,
        replica_config=replica,
        global_scheduler_config=vc.RoundRobinGlobalSchedulerConfig(),
        replica_scheduler_config=scheduler,
    )
    metrics = vc.MetricsConfig(
        store_plots=False,
        enable_chrome_trace=False,
        write_json_trace=False,
        output_dir=metrics_dir,
    )
    return vc.SimulationConfig(
        seed=args.seed,
        cluster_config=cluster,
        request_generator_config=requests,
        execution_time_predictor_config=predictor,
        metrics_config=metrics,
    )


def main(argv: list[str] | None = None) -> None:
    """Generate profiles if needed, run the simulation, print VIDUR_JSON."""
    args = parse_args(argv)
    args.cache_dir = args.cache_dir.resolve()
    profiles = import_profiles()
    t0 = time.perf_counter()
    wrote = profiles.ensure_profiles(args.cache_dir)
    profiles_s = time.perf_counter() - t0

    from vidur.entities import BatchStage
    from vidur.simulator import Simulator
    from vidur.utils.random import set_seeds

    marks: dict[str, float] = {}

    class TimedSimulator(Simulator):
        """Records when the event loop hands over to output writing."""

        def _write_output(self) -> None:
            marks["loop_end"] = time.perf_counter()
            super()._write_output()

    with tempfile.TemporaryDirectory(prefix="vidur-metrics-") as metrics_dir:
        config = build_config(args, metrics_dir)
        set_seeds(config.seed)
        t_init = time.perf_counter()
        sim = TimedSimulator(config)
        t_loop = time.perf_counter()
        stage_id0 = BatchStage._id
        sim.run()
        t_end = time.perf_counter()
    stages = BatchStage._id - stage_id0

    wall = t_end - T_START
    loop = marks["loop_end"] - t_loop
    pred_cfg = config.execution_time_predictor_config
    result = {
        "vidur_version": version("vidur"),
        "num_requests": args.requests,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "qps": args.qps,
        "scheduler": args.scheduler,
        "simulated_s": sim._time,
        "wall_s": wall,
        "event_loop_s": loop,
        "requests_per_wall_min": args.requests / wall * 60,
        "requests_per_wall_min_loop": args.requests / loop * 60,
        "batch_stages": stages,
        "batch_stages_per_wall_s": stages / loop,
        "init_s": t_loop - t_init,
        "profiles_written": wrote,
        "profiles_s": profiles_s,
        "prediction_table_tokens": pred_cfg.prediction_max_tokens_per_request,
    }
    print("VIDUR_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
