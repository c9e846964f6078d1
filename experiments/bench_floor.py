"""A per-user speed floor kept by the scheduler, in the twin: admission "all" (fcfs + lru) beside "tps_floor".

    python -m experiments.bench_floor                      # swe_smith at concurrency 1-8, agentic_coding at 3 rates
    python -m experiments.bench_floor --quick              # fewer sessions
    python -m experiments.bench_floor --tok-s 70 --json out.json --model llama3_8b --hardware h100_sxm

Each row is one whole simulation (one replica of `--model` on `--hardware`, the roofline cost unless
--cost profile, lru retention, fcfs order) run twice: with every prefill chunk and request admitted as
it fits ("all"), and with `tps_floor:tok_s=T`, which admits only what keeps each step a decode runs in
within 1 / T seconds by the same cost model (csrc/policies.h; docs/policies.md, "Admission").

Columns (sim/metrics.py defines them): the share of output tokens (after each request's first) that
came within 1 / T of the request's previous token; those tokens per second per GPU ("floor goodput");
requests per second per GPU within both SLOs (TTFT <= sim.slo_ttft_s, TPOT <= 1 / T); per-user tok/s
p50 and per-GPU output tok/min; TTFT p50 and p90; requests the policy held longer than its max_wait_s
(admitted late, or still waiting at the end); recompute preemptions.

The twin's figures only: the engine runs the same policy (EngineConfig.step_cost), but a GPU
measurement beside these is a separate run (docs/perf.md).
"""

from __future__ import annotations

import argparse
import json
import time

from sim.simulation import Simulation

COLUMNS = (
    ("floor_token_share", "at floor", "{:.3f}"),
    ("floor_goodput_tok_s_per_gpu", "floor tok/s/GPU", "{:.0f}"),
    ("goodput_req_s_per_gpu", "goodput req/s", "{:.3f}"),
    ("per_user_tok_s_p50", "user tok/s p50", "{:.1f}"),
    ("per_gpu_output_tok_min", "GPU tok/min", "{:.0f}"),
    ("ttft_s_p50", "TTFT p50 s", "{:.2f}"),
    ("ttft_s_p90", "TTFT p90 s", "{:.2f}"),
    ("held_too_long", "held>max", "{:d}"),
    ("num_preemptions_recompute", "preempt", "{:d}"),
)


def run(workload: str, mode: str, level: float, admission: str, args: argparse.Namespace) -> dict:
    """One simulation; its summary, with `held_too_long` (admitted late + still waiting late)."""
    sim = {
        "mode": mode,
        "num_sessions": args.sessions if mode == "closed" else args.open_sessions,
        "seed": args.seed,
        "progress": False,
        "slo_tpot_s": 1.0 / args.tok_s,
        "cost_model": args.cost,
    }
    if mode == "closed":
        sim["concurrency"] = int(level)
    else:
        sim["session_rate"] = level
    cfg = {
        "model": args.model,
        "hardware": args.hardware,
        "workload": {"name": workload, "params": {}},
        "scheduler": {"admission": admission},
        "sim": sim,
        "wandb": {"mode": "disabled"},
    }
    summary = Simulation(_resolved(cfg)).run().summary
    summary["held_too_long"] = summary["num_held_too_long"] + summary["num_held_waiting"]
    return summary


def _resolved(cfg: dict) -> dict:
    """`model` and `hardware` given by conf name, as the Simulation's mapping takes them (the specs' fields)."""
    import dataclasses

    from sim.specs import load_hardware_spec, load_model_spec

    return {
        **cfg,
        "model": dataclasses.asdict(load_model_spec(cfg["model"])),
        "hardware": dataclasses.asdict(load_hardware_spec(cfg["hardware"])),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tok-s", type=float, default=70.0, help="the floor, output tokens a second per user")
    p.add_argument("--policy", default=None, help="the floor policy's spec (default: tps_floor:tok_s=TOK_S)")
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--hardware", default="h100_sxm")
    p.add_argument("--cost", default="roofline", choices=("roofline", "profile"))
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8], help="swe_smith, closed loop")
    p.add_argument("--rates", type=float, nargs="*", default=[0.04, 0.08, 0.16], help="agentic_coding sessions/s")
    p.add_argument("--sessions", type=int, default=24, help="swe_smith sessions a level")
    p.add_argument("--open-sessions", type=int, default=120, help="agentic_coding sessions a rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8 and 30 sessions")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.open_sessions = 8, 30
    floor = args.policy or f"tps_floor:tok_s={args.tok_s:g}"
    levels = [("swe_smith", "closed", c) for c in args.concurrency] + [
        ("agentic_coding", "open", r) for r in args.rates
    ]
    print(
        f"{args.model} on {args.hardware} ({args.cost} cost), floor {args.tok_s:g} tok/s per user; "
        f"'all' (fcfs + lru) beside '{floor}'"
    )
    head = f"{'workload':<15} {'level':>6} {'admission':<10}" + "".join(f" {name:>15}" for _, name, _ in COLUMNS)
    print(head)
    rows = []
    for workload, mode, level in levels:
        for label, admission in (("all", "all"), ("tps_floor", floor)):
            t0 = time.perf_counter()
            s = run(workload, mode, level, admission, args)
            row = {"workload": workload, "level": level, "admission": admission, "wall_s": time.perf_counter() - t0}
            row.update({key: s[key] for key, _, _ in COLUMNS})
            rows.append(row)
            shown = "".join(f" {fmt.format(row[key]):>15}" for key, _, fmt in COLUMNS)
            lv = f"c{level}" if mode == "closed" else f"{level:g}/s"
            print(f"{workload:<15} {lv:>6} {label:<10}{shown}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
