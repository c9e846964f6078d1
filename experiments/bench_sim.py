"""Simulation speed: simulated requests per wall-clock minute and simulated steps per second.

    python -m experiments.bench_sim            # agentic_coding on Llama-3-8B / H100, several loads
    python -m experiments.bench_sim --both     # each row step by step too (sim.fast_forward=false)
    python -m experiments.bench_sim --quick    # a smoke-sized run
    python -m experiments.bench_sim --vidur .vidur/bin/python   # and Vidur beside it (scripts/vidur/README.md)

Each row is one whole simulation (one replica, roofline cost, lru), run in this
process on one core, timed from the first simulated event to the last (set-up
and output writing excluded). The load is the open-loop session arrival rate;
more load means larger batches, so fewer steps per request.

With --vidur PYTHON (a Python that has PyPI `vidur` installed), the same run then times Vidur
(scripts/vidur/run.py, synthetic profiles) on as many requests as the first agentic row, shaped
like it: 50,000 prompt tokens and 500 output tokens each, one H100, Llama-3-8B. Its "wall s" is
its event loop alone (set-up, predictor training or loading and output excluded, as here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from sim.simulation import Simulation


def run(
    workload: str,
    sessions: int,
    rate: float | None,
    replicas: int,
    mode: str = "open",
    concurrency: int = 8,
    seed: int = 0,
    fast_forward: bool = True,
) -> dict:
    cfg = {
        "workload": {"name": workload, "params": {}},
        "cluster": {"num_replicas": replicas, "router": "least_loaded" if replicas > 1 else "round_robin"},
        "sim": {
            "num_sessions": sessions,
            "session_rate": rate,
            "seed": seed,
            "progress": False,
            "mode": mode,
            "concurrency": concurrency,
            "fast_forward": fast_forward,
        },
        "wandb": {"mode": "disabled"},
    }
    return Simulation(cfg).run().summary


def run_vidur(python: str, requests: int, qps: float = 0.15, cache_dir: str = ".vidur-cache") -> dict:
    """Vidur on `requests` agentic-shaped requests (scripts/vidur/run.py); its VIDUR_JSON line."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "vidur", "run.py")
    cmd = [
        python,
        script,
        "--requests",
        str(requests),
        "--prefill",
        "50000",
        "--decode",
        "500",
        "--qps",
        str(qps),
        "--cache-dir",
        os.path.abspath(cache_dir),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("VIDUR_JSON ")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed no VIDUR_JSON line")
    return json.loads(lines[-1][len("VIDUR_JSON ") :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--both", action="store_true", help="also run each row step by step (fast path off)")
    parser.add_argument("--vidur", metavar="PYTHON", help="also time Vidur with this Python (it has `vidur` installed)")
    args = parser.parse_args(argv)
    if args.vidur and not os.path.exists(args.vidur):
        sys.exit(f"--vidur {args.vidur}: no such Python (see scripts/vidur/README.md)")
    rows = [
        ("agentic_coding", args.sessions, 0.05, 1),
        ("agentic_coding", args.sessions, 0.2, 1),
        ("agentic_coding", args.sessions, 0.8, 4),
        ("chat", args.sessions * 5, 5.0, 1),
    ]
    if args.quick:
        rows = [("agentic_coding", 20, 0.2, 1)]
    print(
        f"simulation speed, llama3_8b on h100_sxm (roofline), policy lru; {platform.machine()}, "
        f"python {platform.python_version()}"
    )
    header = (
        f"{'workload':>15} {'rate/s':>6} {'GPUs':>4} {'fast':>4} {'requests':>8} {'steps':>8} {'batch':>6} | "
        f"{'wall s':>7} {'req/min':>9} {'steps/s':>8} | {'sim s':>7}"
    )
    print(header)
    print("-" * len(header))
    first_requests = 0
    for workload, sessions, rate, replicas in rows:
        for fast in (False, True) if args.both else (True,):
            s = run(workload, sessions, rate, replicas, fast_forward=fast)
            batch = (s["output_tokens"]) / max(s["num_steps"], 1)
            print(
                f"{workload:>15} {rate:>6} {replicas:>4} {'on' if fast else 'off':>4} {s['num_requests']:>8} "
                f"{s['num_steps']:>8} {batch:>6.1f} | {s['wall_seconds']:>7.1f} {s['requests_per_wall_min']:>9.0f} "
                f"{s['steps_per_wall_s']:>8.0f} | {s['simulated_seconds']:>7.0f}",
                flush=True,
            )
            first_requests = first_requests or s["num_requests"]
    if args.vidur:
        v = run_vidur(args.vidur, first_requests)
        batch = v["num_requests"] * v["decode_tokens"] / max(v["batch_stages"], 1)
        print(
            f"{'vidur ' + v['vidur_version']:>15} {v['qps']:>6} {1:>4} {'-':>4} {v['num_requests']:>8} "
            f"{v['batch_stages']:>8} {batch:>6.1f} | {v['event_loop_s']:>7.1f} "
            f"{v['requests_per_wall_min_loop']:>9.0f} {v['batch_stages_per_wall_s']:>8.0f} | "
            f"{v['simulated_s']:>7.0f}   (50K+500-token requests; {v['wall_s']:.1f} s in all with set-up)"
        )


if __name__ == "__main__":
    main()
