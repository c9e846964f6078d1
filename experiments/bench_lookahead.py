"""Look-ahead policy choice beside every fixed candidate, in the twin; and what a decision costs the engine's loop.

    python -m experiments.bench_lookahead                       # swe_smith at concurrency 8, three seeds
    python -m experiments.bench_lookahead --quick               # one seed, fewer sessions
    python -m experiments.bench_lookahead --engine              # and the CPU engine's step time with and without

The twin part: for each seed, swe_smith sessions (closed loop, Llama-3-8B on h100_sxm, roofline) under
each candidate ordering alone, then under `sim.lookahead` choosing between them every --every-s seconds
by running the scheduler's snapshot --horizon-s ahead (sim/lookahead.py), on the objective (mean time to
first token by default, which the table reports). The engine part (--engine): a tiny random-weight model
on this CPU serves the same requests with and without a look-ahead (its candidates' runs on a worker
thread; its two candidates are the same policy, so both runs make the same steps and any change in
their time is the look-ahead's cost to the loop): the step time's median and 90th percentile, and the
look-ahead's own costs. Every twin run must complete (the script stops otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

from sim.simulation import Simulation

CANDIDATES = ("fcfs", "longest_prefix_match", "cache_credit", "session_las")
FIGURE = {
    "ttft": ("ttft_s_mean", "mean TTFT s", min),
    "floor_goodput": ("floor_goodput_tok_s_per_gpu", "floor tok/s/GPU", max),
    "throughput": ("per_gpu_output_tok_s", "GPU tok/s", max),
}  # noqa: E501


def twin(args, seed: int, ordering: str | None, lookahead: bool) -> dict:
    sim = {"mode": "closed", "concurrency": args.concurrency, "num_sessions": args.sessions, "seed": seed}
    sim["progress"] = False
    if lookahead:
        sim["lookahead"] = {
            "candidates": [f"ordering={c}" for c in args.candidates],
            "every_s": args.every_s,
            "horizon_s": args.horizon_s,
            "objective": args.objective,
        }
    cfg = {
        "workload": {"name": args.workload, "params": {}},
        "scheduler": {"ordering": ordering or args.candidates[0]},
        "sim": sim,
        "wandb": {"mode": "disabled"},
    }
    t0 = time.perf_counter()
    s = Simulation(cfg).run().summary
    s["wall_s"] = time.perf_counter() - t0
    if not s["completed"]:
        raise SystemExit(f"seed {seed}, {ordering or 'look-ahead'}: the run did not complete")
    return s


def engine_steps(lookahead: bool, args) -> tuple[list[float], dict]:
    """The engine's loop step times serving one batch of requests (and the look-ahead's summary): on a GPU
    the Llama-3-8B shape in bf16 (random weights), 16 requests of 2,000-8,000 prompt tokens (more than its
    4,096 KV blocks hold at once) and 256 output tokens;
    on the CPU a tiny model, 16 requests of 200-800 tokens and 64 output tokens."""
    import tempfile

    import torch

    from engine import LLM, SamplingParams

    if torch.cuda.is_available():
        from experiments.calibrate import hardware_name

        config, spec, hardware = (
            "llama-3.1-8b",
            "llama3_8b",
            hardware_name(SimpleNamespace(device=torch.device("cuda"))),
        )
        device, options, lengths, max_tokens = "cuda", {"dtype": "bfloat16", "num_gpu_blocks": 4096}, 2000, 256
    else:
        from experiments.adversary import write_tiny_model

        config, spec = write_tiny_model(tempfile.mkdtemp())
        hardware, device, options, lengths, max_tokens = "cpu", "cpu", {"num_gpu_blocks": 1024}, 200, 64
    extra = {}
    if lookahead:
        extra["step_cost"] = {"model": spec, "hardware": hardware}
        # two candidates that plan alike: the steps are the same ones, so any change in their time is the
        # look-ahead's own cost to the loop (its snapshot, and the worker thread's share of the CPU)
        extra["lookahead"] = {
            "candidates": [f"ordering={args.candidates[0]}"] * 2,
            "every_s": 0.02,
            "horizon_s": 0.5,
            "objective": args.objective,
        }
    llm = LLM(config, load_format="dummy", device=device, seed=0, **options, **extra)
    prompts = [
        {"prompt_token_ids": [3 + (i * 7 + k) % 500 for k in range(lengths + lengths // 5 * i)]} for i in range(16)
    ]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    llm.generate(prompts, params, use_tqdm=False)
    seconds = [row["seconds"] for row in llm.engine.profile]
    summary = llm.engine.lookahead.summary() if llm.engine.lookahead else {}
    llm.engine.close()
    return seconds, summary


def twin_table(args) -> dict:
    """Every fixed candidate and the look-ahead in the twin, per seed: prints the table and the decision costs."""
    key, label, best = FIGURE[args.objective]
    print(
        f"{args.workload} c{args.concurrency}, {args.sessions} sessions a seed, Llama-3-8B / h100_sxm roofline; "
        f"look-ahead every {args.every_s:g} s over {args.horizon_s:g} s on {args.objective}; {label}"
    )
    rows = {c: [] for c in args.candidates} | {"lookahead": []}
    costs = []
    for seed in args.seeds:
        for c in args.candidates:
            rows[c].append(twin(args, seed, c, False)[key])
        s = twin(args, seed, None, True)
        rows["lookahead"].append(s[key])
        costs.append(s)
    width = max(len(c) for c in rows) + 2
    print(f"{'policy':<{width}}" + "".join(f" seed {seed:>4}" for seed in args.seeds) + "       mean")
    for name, values in rows.items():
        print(f"{name:<{width}}" + "".join(f" {v:>9.3f}" for v in values) + f" {statistics.mean(values):>10.3f}")
    fixed_best = best(statistics.mean(rows[c]) for c in args.candidates)
    la = statistics.mean(rows["lookahead"])
    beats = la < fixed_best if best is min else la > fixed_best
    print(f"look-ahead {la:.3f} vs the best fixed candidate {fixed_best:.3f}: {'better' if beats else 'not better'}")
    decisions = sum(s["lookahead_decisions"] for s in costs)
    if not decisions:
        raise SystemExit("the look-ahead made no decision: runs shorter than --every-s")
    snap = sum(s["lookahead_snapshot_ms"] * s["lookahead_decisions"] for s in costs) / decisions
    fwd = sum(s["lookahead_forward_ms"] * s["lookahead_decisions"] for s in costs) / decisions
    print(
        f"per decision: snapshot {snap:.2f} ms, {len(args.candidates)} forward runs {fwd:.1f} ms (wall, this CPU); "
        f"{decisions} decisions, {sum(s['lookahead_switches'] for s in costs)} switches"
    )
    return {"rows": rows, "snapshot_ms": snap, "forward_ms": fwd, "decisions": decisions}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="swe_smith")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="orderings to choose between")
    p.add_argument("--every-s", type=float, default=1.0)
    p.add_argument("--horizon-s", type=float, default=2.0)
    p.add_argument("--objective", default="ttft", choices=sorted(FIGURE))
    p.add_argument("--quick", action="store_true", help="seed 0, 8 sessions")
    p.add_argument("--engine", action="store_true", help="also the engine's step time with and without (GPU or CPU)")
    p.add_argument("--engine-only", action="store_true", help="only the engine's step time (no twin runs)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sessions = [0], 8
    out = {} if args.engine_only else twin_table(args)
    if args.engine or args.engine_only:
        import torch

        where = "GPU" if torch.cuda.is_available() else "CPU"
        # on a GPU the first engine of the process also compiles the Triton kernels: a second one without the
        # look-ahead, after it, is the baseline to read
        runs = (
            ((False, "off"), (True, "on"), (False, "off_again")) if where == "GPU" else ((False, "off"), (True, "on"))
        )
        for on, tag in runs:
            seconds, summary = engine_steps(on, args)
            q = statistics.quantiles(seconds, n=10)
            name = {"off": "without", "on": "with look-ahead", "off_again": "without, again"}[tag]
            print(
                f"{where} engine {name:<16}: {len(seconds)} steps, step p50 {1e3 * statistics.median(seconds):.2f} ms, "
                f"p90 {1e3 * q[8]:.2f} ms"
                + (
                    f"; {summary['lookahead_decisions']} decisions, snapshot {summary['lookahead_snapshot_ms']:.2f} ms "
                    f"on the loop, forward runs {summary['lookahead_forward_ms']:.1f} ms on its thread"
                    if summary
                    else ""
                )
            )
            out[f"engine_{tag}"] = {"seconds": seconds, **summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return out


if __name__ == "__main__":
    main()
