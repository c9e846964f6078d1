"""Control-plane overhead: step + commit latency with N requests decoding at long contexts.

    python -m experiments.bench_controlplane            # the full table (1-1024 requests, 4K-50K tokens)
    python -m experiments.bench_controlplane --quick    # a small table for a smoke check

Each row fills a scheduler with N requests whose prompts have `context`
distinct tokens (no prefix sharing), prefills them, then times `steps` decode
iterations of ``plan = step(now); <read the plan's arrays>; commit(plan, tokens, now)``
from Python, as an execution plane calls them. The arrays read are those a
model runner needs (input ids, positions, slot mapping, query start offsets,
sampled indices, block table). Prefix caching stays on, so commits register
each block that fills up. No request finishes during the timed steps.

Prints one row per (N, context): microseconds per step+commit (mean, p50,
p99), the step and commit parts, and microseconds per request.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import controlplane as cp


def fill(num_reqs: int, context: int, block_size: int, seed: int) -> cp.Scheduler:
    """A scheduler with `num_reqs` requests prefilled to `context` tokens, each about to decode."""
    steps_ahead = 4096  # generous headroom: decode steps never run out of KV or length
    max_model_len = context + steps_ahead
    blocks_per_req = -(-(max_model_len) // block_size)
    budget = max(num_reqs, 1 << 16)
    sched = cp.Scheduler(
        num_blocks=num_reqs * blocks_per_req,
        block_size=block_size,
        max_num_seqs=max(num_reqs, 1),
        max_num_batched_tokens=budget,
        chunk_size=budget,
        max_model_len=max_model_len,
        vocab_size=128256,
    )
    rng = np.random.default_rng(seed)
    for rid in range(num_reqs):
        prompt = rng.integers(0, 128256, size=context, dtype=np.int32)
        sched.add_request(rid, prompt, max_new_tokens=steps_ahead - 1, ignore_eos=True)
    now = 0.0
    while sched.stats().num_waiting or any_prefilling(sched, num_reqs):
        plan = sched.step(now)
        sched.commit(plan, np.full(plan.num_sampled, 7, dtype=np.int64), now)
        now += 1.0
    return sched


def any_prefilling(sched: cp.Scheduler, num_reqs: int) -> bool:
    return sched.stats().num_running < num_reqs or any(
        sched.request_info(r)["state"] == "PREFILLING" for r in range(num_reqs)
    )


def measure(sched: cp.Scheduler, num_reqs: int, steps: int, now: float = 1e6) -> dict[str, float]:
    tokens = np.full(num_reqs, 11, dtype=np.int64)
    total, step_part, commit_part = [], [], []
    clock = time.perf_counter_ns
    for k in range(steps + 10):
        t0 = clock()
        plan = sched.step(now)
        t1 = clock()
        # What a model runner reads from the plan.
        plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start_loc
        plan.logits_indices, plan.block_table, plan.slots, plan.kv_ops
        t2 = clock()
        sched.commit(plan, tokens, now)
        t3 = clock()
        if plan.num_reqs != num_reqs:
            raise RuntimeError(f"expected {num_reqs} decoding requests, plan has {plan.num_reqs}")
        if k >= 10:  # warm-up
            total.append(t3 - t0)
            step_part.append(t2 - t0)
            commit_part.append(t3 - t2)
        now += 0.01
    us = lambda xs: np.asarray(xs) / 1e3  # noqa: E731
    return dict(
        mean=us(total).mean(),
        p50=np.median(us(total)),
        p99=np.percentile(us(total), 99),
        step=us(step_part).mean(),
        commit=us(commit_part).mean(),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="1,64,256,1024", help="comma-separated running-request counts")
    parser.add_argument("--contexts", default="4096,16384,50000", help="comma-separated context lengths")
    parser.add_argument("--steps", type=int, default=300, help="timed decode steps per row")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.contexts, args.steps = "1,64", "4096", 50
    requests = [int(x) for x in args.requests.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]

    print(f"control-plane step+commit latency, block_size={args.block_size}, {args.steps} decode steps per row")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    header = (
        f"{'requests':>8} {'context':>8} | {'mean us':>9} {'p50 us':>9} {'p99 us':>9} | "
        f"{'step us':>8} {'commit us':>9} | {'us/req':>7} | {'setup s':>7}"
    )
    print(header)
    print("-" * len(header))
    for context in contexts:
        for n in requests:
            t0 = time.perf_counter()
            sched = fill(n, context, args.block_size, seed=n * 7919 + context)
            setup = time.perf_counter() - t0
            r = measure(sched, n, args.steps)
            sched.check_invariants()
            print(
                f"{n:>8} {context:>8} | {r['mean']:>9.1f} {r['p50']:>9.1f} {r['p99']:>9.1f} | "
                f"{r['step']:>8.1f} {r['commit']:>9.1f} | {r['mean'] / n:>7.2f} | {setup:>7.1f}",
                flush=True,
            )
            del sched


if __name__ == "__main__":
    main()
