"""A short walk through the control plane: what each step scheduled, and why.

    python -m experiments.walkthrough [--preemption swap|recompute] [--eviction ttl:ttl=5]

A small KV cache (20 blocks of 4 tokens) serves a toy model (`ToyModel`,
which reads its context only through the plan's block table, so a wrong plan
shows as wrong tokens). The scenario exercises what the control plane does:

* two agent sessions share a 16-token system prefix: the second computes it
  zero times (prefix cache);
* long prompts are prefilled in chunks mixed with decodes under a token budget;
* KV runs out: a request is preempted (recompute or swap to the host tier) and
  later resumes with exactly the tokens it would have produced;
* a session's finished turn stays pinned by the retention policy across a
  tool-call pause and its next turn reuses it.
"""

from __future__ import annotations

import argparse

import numpy as np

import controlplane as cp
from controlplane.testing import ToyModel, reference_generate

SYSTEM = list(range(100, 116))  # a shared 16-token "system prompt"


def describe(plan: cp.Plan) -> list[str]:
    lines = []
    for i in range(plan.num_reqs):
        c, q = int(plan.cached_lens[i]), int(plan.query_lens[i])
        kind = "decode " if q == 1 and c > 0 and plan.sample[i] else "prefill"
        what = f"tokens [{c}, {c + q})" + (" -> sample" if plan.sample[i] else "")
        lines.append(f"    req {plan.req_ids[i]:>2} {kind} {what}  (slot {plan.slots[i]})")
    for op, src, dst in plan.kv_ops:
        lines.append(f"    kv copy {'device->host' if op == 0 else 'host->device'}: block {src} -> {dst}")
    for rid in plan.preempted_ids:
        lines.append(f"    req {rid:>2} PREEMPTED (out of KV blocks)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemption", default="swap", help="recompute | swap")
    parser.add_argument("--eviction", default="ttl:ttl=5", help="lru | priority | ttl:ttl=SECONDS")
    parser.add_argument("--ordering", default="fcfs", help="fcfs | priority | longest_prefix_match")
    args = parser.parse_args(argv)

    config = cp.SchedulerConfig(
        num_blocks=20,
        block_size=4,
        num_host_blocks=16,
        max_num_seqs=4,
        max_num_batched_tokens=24,
        chunk_size=12,
        max_model_len=96,
        vocab_size=200,
        ordering=args.ordering,
        eviction=args.eviction,
        preemption=args.preemption,
    )
    sched = cp.Scheduler(config)
    model = ToyModel.for_scheduler(config, step_cost=(0.005, 0.0005))
    print("Tandem control plane walk-through")
    print(
        f"  {config.num_blocks} KV blocks x {config.block_size} tokens, {config.num_host_blocks} host blocks, "
        f"budget {config.max_num_batched_tokens} tokens/step, chunk {config.chunk_size}"
    )
    print(f"  policies: ordering={config.ordering} eviction={config.eviction} preemption={config.preemption}\n")

    prompts: dict[int, list[int]] = {}
    arrivals = {  # time -> (request id, prompt, max new tokens, session)
        0.00: [(1, SYSTEM + [1, 2, 3, 4, 5], 6, "agent-a"), (2, list(range(20, 50)), 12, None)],
        0.02: [(3, SYSTEM + [7, 8, 9], 6, "agent-b")],
        0.05: [(4, list(range(50, 80)), 16, None)],
    }
    second_turn_at = None
    now, finished = 0.0, {}
    clock = cp.ManualClock()
    while True:
        now = clock.now()
        for t in sorted(arrivals):
            if t <= now:
                for rid, prompt, max_new, session in arrivals.pop(t):
                    prompts[rid] = (prompt, max_new)
                    sched.add_request(rid, prompt, max_new_tokens=max_new, session_id=session, arrival_time=now)
                    print(
                        f"t={now:6.3f}  + request {rid} arrives: {len(prompt)} prompt tokens"
                        + (f", session {session}" if session else "")
                    )
        if not sched.has_unfinished() and not arrivals:
            break
        plan = sched.step(now)
        if plan.is_empty:
            sched.commit(plan, np.empty(0, np.int64), now)
            clock.advance(min(arrivals) - now if arrivals else 0.1)
            continue
        tokens, cost = model.run(plan)
        clock.advance(cost)
        done = sched.commit(plan, tokens, clock.now())
        stats = sched.stats()
        print(
            f"t={now:6.3f}  step {plan.step_id}: {plan.num_reqs} requests, {plan.num_tokens} tokens "
            f"({cost * 1e3:.1f} ms); KV blocks: {stats.num_used_blocks} held, {stats.num_pinned_blocks} pinned, "
            f"{stats.num_evictable_blocks} evictable, {stats.num_free_blocks} free"
        )
        print("\n".join(describe(plan)))
        for f in done:
            finished[f.request_id] = f
            print(
                f"    req {f.request_id:>2} FINISHED ({f.finish_reason}): {len(f.output_token_ids)} tokens, "
                f"{f.num_cached_tokens} prompt tokens from the prefix cache, {f.num_preemptions} preemptions"
            )
            if f.request_id == 1 and second_turn_at is None:
                # The agent calls a tool for 2 s, then sends its next turn: history + tool result.
                second_turn_at = clock.now() + 2.0
                history = prompts[1][0] + list(f.output_token_ids) + [60, 61, 62]
                arrivals[second_turn_at] = [(5, history, 4, "agent-a")]
                print(
                    f"    (agent-a calls a tool for 2 s; the retention policy ({config.eviction}) pins its "
                    f"turn's blocks for its next turn)"
                )

    print("\nEvery output equals the toy model run alone on its prompt:")
    for rid in sorted(finished):
        prompt, _ = prompts[rid]
        out = list(finished[rid].output_token_ids)
        ok = out == reference_generate(prompt, len(out), config.vocab_size)
        print(f"  request {rid}: {len(out):>2} tokens  {'ok' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(f"request {rid}: outputs differ from the reference")
    sched.check_invariants()
    stats = sched.stats().as_dict()
    keys = [
        "num_steps",
        "computed_tokens",
        "cached_tokens",
        "generated_tokens",
        "num_preemptions_recompute",
        "num_preemptions_swap",
        "num_evicted_blocks",
        "num_pinned_blocks",
    ]
    print("\nstats: " + ", ".join(f"{k}={stats[k]}" for k in keys))
    sched.end_session("agent-a", clock.now())
    sched.end_session("agent-b", clock.now())


if __name__ == "__main__":
    main()
