"""Simulation speed: simulated requests per wall-clock minute and simulated steps per second.

    python -m experiments.bench_sim            # agentic_coding on Llama-3-8B / H100, several loads
    python -m experiments.bench_sim --both     # each row step by step too (sim.fast_forward=false)
    python -m experiments.bench_sim --quick    # a smoke-sized run

Each row is one whole simulation (one replica, roofline cost, lru), run in this
process on one core, timed from the first simulated event to the last (set-up
and output writing excluded). The load is the open-loop session arrival rate;
more load means larger batches, so fewer steps per request.
"""

from __future__ import annotations

import argparse
import platform

from sim.simulation import Simulation


def run(workload: str, sessions: int, rate: float | None, replicas: int, mode: str = "open",
        concurrency: int = 8, seed: int = 0, fast_forward: bool = True) -> dict:
    cfg = {"workload": {"name": workload, "params": {}},
           "cluster": {"num_replicas": replicas, "router": "least_loaded" if replicas > 1 else "round_robin"},
           "sim": {"num_sessions": sessions, "session_rate": rate, "seed": seed, "progress": False, "mode": mode,
                   "concurrency": concurrency, "fast_forward": fast_forward},
           "wandb": {"mode": "disabled"}}
    return Simulation(cfg).run().summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--both", action="store_true", help="also run each row step by step (fast path off)")
    args = parser.parse_args(argv)
    rows = [("agentic_coding", args.sessions, 0.05, 1), ("agentic_coding", args.sessions, 0.2, 1),
            ("agentic_coding", args.sessions, 0.8, 4), ("chat", args.sessions * 5, 5.0, 1)]
    if args.quick:
        rows = [("agentic_coding", 20, 0.2, 1)]
    print(f"simulation speed, llama3_8b on h100_sxm (roofline), policy lru; {platform.machine()}, "
          f"python {platform.python_version()}")
    header = (f"{'workload':>15} {'rate/s':>6} {'GPUs':>4} {'fast':>4} {'requests':>8} {'steps':>8} {'batch':>6} | "
              f"{'wall s':>7} {'req/min':>9} {'steps/s':>8} | {'sim s':>7}")
    print(header)
    print("-" * len(header))
    for workload, sessions, rate, replicas in rows:
        for fast in ((False, True) if args.both else (True,)):
            s = run(workload, sessions, rate, replicas, fast_forward=fast)
            batch = (s["output_tokens"]) / max(s["num_steps"], 1)
            print(f"{workload:>15} {rate:>6} {replicas:>4} {'on' if fast else 'off':>4} {s['num_requests']:>8} "
                  f"{s['num_steps']:>8} {batch:>6.1f} | {s['wall_seconds']:>7.1f} {s['requests_per_wall_min']:>9.0f} "
                  f"{s['steps_per_wall_s']:>8.0f} | {s['simulated_seconds']:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
