"""Batch planning with hand-computed answers: chunks, budget, mixing, caps, stop conditions, order."""

from __future__ import annotations

import numpy as np

from controlplane.testing import reference_generate

from helpers import drain, make, step

V = 97


def rows(plan):
    """The per-request part of a plan as plain lists."""
    return dict(
        req_ids=plan.req_ids.tolist(),
        query_lens=plan.query_lens.tolist(),
        cached_lens=plan.cached_lens.tolist(),
        sample=plan.sample.tolist(),
    )


def check_addressing(plan):
    """Every token's slot is its position's offset inside its request's block-table row."""
    bs = plan.block_size
    for i in range(plan.num_reqs):
        lo, hi = plan.query_start_loc[i], plan.query_start_loc[i + 1]
        pos = plan.positions[lo:hi]
        assert pos.tolist() == list(range(plan.cached_lens[i], plan.cached_lens[i] + plan.query_lens[i]))
        row = plan.block_table[plan.slots[i]]
        assert (plan.slot_mapping[lo:hi] == row[pos // bs].astype(np.int64) * bs + pos % bs).all()


def test_chunked_prefill_then_decode():
    sched, model = make(chunk_size=4, block_size=4)
    prompt = list(range(10, 20))
    sched.add_request(1, prompt, max_new_tokens=4)
    expected = [
        ([4], [0], [False]),
        ([4], [4], [False]),
        ([2], [8], [True]),
        ([1], [10], [True]),
        ([1], [11], [True]),
        ([1], [12], [True]),
    ]
    out = reference_generate(prompt, 4, V)
    blocks = [1, 2, 3, 3, 3, 4]
    for k, (q, c, s) in enumerate(expected):
        tables = []
        plan, done = step(
            sched,
            model,
            float(k),
            inspect=lambda p: (check_addressing(p), tables.append(p.block_table[p.slots[0]].copy())),
        )
        assert rows(plan) == dict(req_ids=[1], query_lens=q, cached_lens=c, sample=s)
        assert plan.query_start_loc.tolist() == [0, q[0]]
        assert plan.logits_indices.tolist() == ([q[0] - 1] if s[0] else [])
        if k < 3:
            assert plan.input_ids.tolist() == prompt[c[0] : c[0] + q[0]]
        else:
            assert plan.input_ids.tolist() == [out[k - 3]]  # the token sampled one step earlier
        assert (tables[0] >= 0).sum() == blocks[k]
    assert list(done[1].output_token_ids) == out and done[1].finish_reason == "length"
    assert sched.stats().num_used_blocks == 0


def test_token_budget_and_mixed_batch():
    sched, model = make(max_num_batched_tokens=8, chunk_size=64)
    a, b = list(range(1, 11)), list(range(30, 36))
    sched.add_request(1, a, max_new_tokens=3)
    sched.add_request(2, b, max_new_tokens=3)
    plan, _ = step(sched, model, 0.0)
    assert rows(plan) == dict(req_ids=[1], query_lens=[8], cached_lens=[0], sample=[False])
    plan, _ = step(
        sched, model, 1.0, inspect=check_addressing
    )  # A's last 2 prompt tokens, then B's 6: exactly the budget
    assert rows(plan) == dict(req_ids=[1, 2], query_lens=[2, 6], cached_lens=[8, 0], sample=[True, True])
    assert plan.query_start_loc.tolist() == [0, 2, 8]
    assert plan.logits_indices.tolist() == [1, 7]
    plan, _ = step(sched, model, 2.0)
    assert rows(plan) == dict(req_ids=[1, 2], query_lens=[1, 1], cached_lens=[10, 6], sample=[True, True])
    assert plan.logits_indices.tolist() == [0, 1]
    # A decode and a new prefill chunk in one batch.
    sched.add_request(3, list(range(50, 62)), max_new_tokens=2)
    plan, done = step(sched, model, 3.0, inspect=check_addressing)
    assert rows(plan) == dict(
        req_ids=[1, 2, 3], query_lens=[1, 1, 6], cached_lens=[11, 7, 0], sample=[True, True, False]
    )
    assert plan.logits_indices.tolist() == [0, 1]
    # cost features: pairs q*c + q(q+1)/2 = (11+1) + (7+1) + (0+21); KV reads c+q = 12 + 8 + 6
    assert (plan.attn_pairs, plan.kv_read_tokens) == (41, 26)
    assert (plan.num_swap_out_blocks, plan.num_swap_in_blocks) == (0, 0)
    assert sorted(done) == [1, 2]
    done, _ = drain(sched, model, now=4.0)
    assert list(done[3].output_token_ids) == reference_generate(list(range(50, 62)), 2, V)


def test_max_num_seqs_caps_running_requests():
    sched, model = make(max_num_seqs=2)
    for rid in range(3):
        sched.add_request(rid, [rid + 1, 5, 6], max_new_tokens=3)
    plan, _ = step(sched, model, 0.0)
    assert plan.req_ids.tolist() == [0, 1]
    assert sched.stats().num_running == 2 and sched.stats().num_waiting == 1
    step(sched, model, 1.0)
    plan, done = step(sched, model, 2.0)
    assert sorted(done) == [0, 1] and plan.req_ids.tolist() == [0, 1]
    plan, _ = step(sched, model, 3.0)
    assert rows(plan) == dict(req_ids=[2], query_lens=[3], cached_lens=[0], sample=[True])
    assert set(plan.slots.tolist()) <= {0, 1}  # slots are reused


def test_stop_conditions():
    prompt = [4, 8, 15, 16, 23, 42]
    ref = reference_generate(prompt, 30, V)
    # max new tokens
    sched, model = make()
    sched.add_request(1, prompt, max_new_tokens=5)
    done, _ = drain(sched, model)
    assert done[1].finish_reason == "length" and list(done[1].output_token_ids) == ref[:5]
    # a stop token id: the first position where it appears
    k = next(i for i in range(2, 30) if ref[i] not in ref[:i])
    sched, model = make()
    sched.add_request(1, prompt, max_new_tokens=30, stop_token_ids=[ref[k]])
    done, _ = drain(sched, model)
    assert done[1].finish_reason == "stop" and list(done[1].output_token_ids) == ref[: k + 1]
    # end of sequence, and the same EOS ignored
    sched, model = make()
    sched.add_request(1, prompt, max_new_tokens=30, eos_token_id=ref[k])
    sched.add_request(2, prompt, max_new_tokens=k + 3, eos_token_id=ref[k], ignore_eos=True)
    done, _ = drain(sched, model)
    assert done[1].finish_reason == "stop" and list(done[1].output_token_ids) == ref[: k + 1]
    assert done[2].finish_reason == "length" and list(done[2].output_token_ids) == ref[: k + 3]
    # model length: 6 prompt tokens + 4 outputs = max_model_len 10
    sched, model = make(max_model_len=10)
    sched.add_request(1, prompt, max_new_tokens=30)
    done, _ = drain(sched, model)
    assert done[1].finish_reason == "model_length" and list(done[1].output_token_ids) == ref[:4]
    # the very first token can stop a request (PREFILLING -> FINISHED)
    sched, model = make()
    sched.add_request(1, prompt, max_new_tokens=30, stop_token_ids=[ref[0]])
    plan, done = step(sched, model, 0.0)
    assert done[1].finish_reason == "stop" and list(done[1].output_token_ids) == ref[:1]
    assert done[1].num_prompt_tokens == 6


def run_order(ordering, **kwargs):
    sched, model = make(max_num_seqs=1, ordering=ordering, **kwargs)
    sched.add_request(1, [1, 2, 3], max_new_tokens=1, priority=2, arrival_time=0.0)
    sched.add_request(2, [4, 5, 6], max_new_tokens=1, priority=0, arrival_time=1.0)
    sched.add_request(3, [7, 8, 9], max_new_tokens=1, priority=1, arrival_time=2.0)
    order = []
    now = 3.0
    while sched.has_unfinished():
        plan, _ = step(sched, model, now)
        order += plan.req_ids.tolist()
        now += 1
    return order


def test_fcfs_and_priority_order():
    assert run_order("fcfs") == [1, 2, 3]
    assert run_order("priority") == [2, 3, 1]


def test_longest_prefix_match_admits_the_best_hit_first():
    sched, model = make(max_num_seqs=1, ordering="longest_prefix_match")
    shared = list(range(40, 56))  # 4 full blocks
    sched.add_request(0, shared + [1], max_new_tokens=1)
    drain(sched, model)
    sched.add_request(1, [9, 9, 9, 9, 9], max_new_tokens=1, arrival_time=10.0)
    sched.add_request(2, shared[:8] + [3, 3], max_new_tokens=1, arrival_time=11.0)
    sched.add_request(3, shared + [2, 2], max_new_tokens=1, arrival_time=12.0)
    order = []
    now = 20.0
    while sched.has_unfinished():
        plan, _ = step(sched, model, now)
        order += list(zip(plan.req_ids.tolist(), plan.cached_lens.tolist()))
        now += 1
    assert order == [(3, 16), (2, 8), (1, 0)]
