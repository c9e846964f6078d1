"""Preemption when KV runs out: recompute and swap resume with the tokens they would have produced."""

from __future__ import annotations

from controlplane.testing import reference_generate

from helpers import make, step

V = 97
A, B = list(range(1, 9)), list(range(30, 38))  # 8 tokens = 2 blocks of 4 each


def run(**overrides):
    """A and B each need up to 5 blocks (8 + 12 - 1 KV tokens); the pool has 6."""
    sched, model = make(num_blocks=6, **overrides)
    sched.add_request(1, A, max_new_tokens=12)
    sched.add_request(2, B, max_new_tokens=12)
    plans, done, now = [], {}, 0.0
    while sched.has_unfinished():
        info = {}
        plan, fin = step(
            sched, model, now, inspect=lambda p: info.update(rows=p.block_table[p.slots].copy() if p.num_reqs else None)
        )
        plans.append((plan, info))
        done.update(fin)
        now += 1.0
    assert list(done[1].output_token_ids) == reference_generate(A, 12, V)
    assert list(done[2].output_token_ids) == reference_generate(B, 12, V)
    return sched, plans, done


def preempting_step(plans):
    idx = [k for k, (p, _) in enumerate(plans) if p.preempted_ids.size]
    assert len(idx) == 1, idx
    return idx[0]


def test_recompute_resumes_with_the_same_tokens():
    sched, plans, done = run(preemption="recompute")
    k = preempting_step(plans)
    # Steps: prefill both (0), decode positions 8..11 (1-4); position 12 needs a 4th block each.
    assert k == 5
    plan, _ = plans[k]
    assert plan.preempted_ids.tolist() == [2]  # the last request in FCFS order
    assert plan.req_ids.tolist() == [1]  # and nothing is admitted in that step
    assert plan.kv_ops.shape == (0, 3)  # recompute: no copies
    assert done[2].num_preemptions == 1 and done[1].num_preemptions == 0
    # B had 8 + 5 tokens; it comes back once A is done and recomputes what it still needs.
    resume = next(p for p, _ in plans[k + 1 :] if 2 in p.req_ids.tolist())
    i = resume.req_ids.tolist().index(2)
    assert resume.cached_lens[i] + resume.query_lens[i] == 13 and resume.sample[i]
    assert resume.cached_lens[i] % 4 == 0 and resume.cached_lens[i] <= 12
    stats = sched.stats()
    assert (stats.num_preemptions_recompute, stats.num_preemptions_swap) == (1, 0)
    assert stats.num_used_blocks == 0


def test_swap_copies_blocks_out_and_back():
    sched, plans, done = run(preemption="swap", num_host_blocks=8)
    k = preempting_step(plans)
    plan, info = plans[k]
    assert plan.preempted_ids.tolist() == [2]
    ops = plan.kv_ops
    assert ops[:, 0].tolist() == [0, 0, 0]  # device -> host, B's 3 blocks
    assert (plan.num_swap_out_blocks, plan.num_swap_in_blocks) == (3, 0)
    before = plans[k - 1][1]["rows"][1]  # B's block-table row before the step
    assert ops[:, 1].tolist() == before[:3].tolist()
    host = ops[:, 2].tolist()
    assert len(set(host)) == 3 and all(0 <= h < 8 for h in host)
    # Swapped in later: host -> device for the same host blocks, then only the last token runs.
    resume_k = next(j for j in range(k + 1, len(plans)) if plans[j][0].kv_ops.size)
    resume, rinfo = plans[resume_k]
    assert resume.kv_ops[:, 0].tolist() == [1, 1, 1] and resume.kv_ops[:, 1].tolist() == host
    i = resume.req_ids.tolist().index(2)
    assert (resume.cached_lens[i], resume.query_lens[i]) == (12, 1)
    assert resume.kv_ops[:, 2].tolist() == rinfo["rows"][i][:3].tolist()
    stats = sched.stats()
    assert (stats.num_preemptions_recompute, stats.num_preemptions_swap) == (0, 1)
    assert stats.num_free_host_blocks == 8 and stats.num_used_blocks == 0
    assert done[2].num_preemptions == 1


def test_swap_without_host_room_falls_back_to_recompute():
    sched, plans, _ = run(preemption="swap", num_host_blocks=2)  # B holds 3 blocks
    assert plans[preempting_step(plans)][0].kv_ops.shape == (0, 3)
    stats = sched.stats()
    assert (stats.num_preemptions_recompute, stats.num_preemptions_swap) == (1, 0)


def test_host_capacity_zero_disables_swap():
    sched, plans, _ = run(preemption="swap", num_host_blocks=0)
    assert sched.stats().num_preemptions_swap == 0


def until_preempted(**overrides):
    """A and B run until B is preempted; returns (sched, model, now)."""
    sched, model = make(num_blocks=6, **overrides)
    sched.add_request(1, A, max_new_tokens=12)
    sched.add_request(2, B, max_new_tokens=12)
    now = 0.0
    while sched.stats().num_preempted == 0:
        step(sched, model, now)
        now += 1
    return sched, model, now


def test_abort_while_swapped_frees_the_host_blocks():
    sched, model, now = until_preempted(preemption="swap", num_host_blocks=8)
    assert sched.request_info(2)["swapped"] and sched.stats().num_free_host_blocks == 5
    sched.abort(2, now)
    assert sched.stats().num_free_host_blocks == 8
    sched.check_invariants()


def test_preempted_request_keeps_its_order_over_later_arrivals():
    sched, model, now = until_preempted()
    sched.add_request(3, [50, 51], max_new_tokens=1, arrival_time=now)
    order = []
    while sched.has_unfinished():
        plan, _ = step(sched, model, now)
        order += [r for r in plan.req_ids.tolist() if r not in order and r != 1]
        now += 1
    assert order == [2, 3]
