"""The shared loop `plan = step(now); tokens = run(plan); commit(plan, tokens, now)`."""

from __future__ import annotations

import numpy as np
import pytest

import controlplane as cp
from controlplane.loop import batch_block_table
from controlplane.testing import ToyModel, reference_generate


def test_run_loop_finishes_everything_with_reference_tokens():
    sched = cp.Scheduler(
        num_blocks=16, block_size=4, vocab_size=101, max_model_len=64, max_num_batched_tokens=16, chunk_size=8
    )
    model = ToyModel.for_scheduler(sched.config, step_cost=(0.01, 0.001))
    prompts = {rid: list(range(rid, rid + 5 + 3 * rid)) for rid in range(6)}
    for rid, prompt in prompts.items():
        sched.add_request(rid, prompt, max_new_tokens=7)
    clock = cp.ManualClock(100.0)
    seen = []
    records = cp.run_loop(sched, model, clock, on_step=lambda rec, plan: seen.append(plan.step_id))
    finished = {f.request_id: f for rec in records for f in rec.finished}
    assert sorted(finished) == list(prompts)
    for rid, prompt in prompts.items():
        assert list(finished[rid].output_token_ids) == reference_generate(prompt, 7, 101)
    assert seen == [r.step_id for r in records]
    for rec in records:
        assert rec.end == pytest.approx(rec.start + 0.01 + 0.001 * rec.num_tokens)
    assert all(a.end == b.start for a, b in zip(records, records[1:]))
    assert sum(r.num_tokens for r in records) == model.tokens_computed
    # Each finished request carries the commit time of every output token.
    ends = [r.end for r in records]
    for f in finished.values():
        times = f.token_times.tolist()
        assert len(times) == f.num_output_tokens == 7 and all(t in ends for t in times)
        assert times == sorted(times) and f.first_token_time == times[0] and f.finish_time == times[-1]
        assert f.arrival_time == 0.0 and f.first_scheduled_time in [r.start for r in records]
        assert f.first_scheduled_time < f.first_token_time
        if f.num_preemptions == 0:
            assert f.num_computed_tokens == f.num_prompt_tokens + 6
        else:
            assert f.num_computed_tokens > f.num_prompt_tokens + 6


def test_empty_plans_need_idle_advance():
    def scenario():
        sched = cp.Scheduler(num_blocks=8, block_size=4, vocab_size=97, max_model_len=64, eviction="ttl:ttl=5")
        model = ToyModel.for_scheduler(sched.config)
        sched.add_request(1, list(range(12)), max_new_tokens=4, session_id="s")
        clock = cp.ManualClock()
        cp.run_loop(sched, model, clock)
        # 3 blocks pinned for 5 s; this one needs 6 of 8 blocks: it waits for the pin to expire.
        sched.add_request(2, list(range(30, 54)), max_new_tokens=1, arrival_time=clock.now())
        return sched, model, clock

    sched, model, clock = scenario()
    with pytest.raises(RuntimeError, match="empty plan"):
        cp.run_loop(sched, model, clock)
    sched, model, clock = scenario()
    start = clock.now()
    records = cp.run_loop(sched, model, clock, idle_advance=1.0)
    assert [f.request_id for r in records for f in r.finished] == [2]
    assert records[0].start >= start + 5


def test_max_steps_bounds_the_loop():
    sched = cp.Scheduler(num_blocks=16, block_size=4, vocab_size=97, max_model_len=64)
    sched.add_request(1, [1, 2, 3], max_new_tokens=10)
    with pytest.raises(RuntimeError, match="within 3 steps"):
        cp.run_loop(sched, ToyModel.for_scheduler(sched.config), cp.ManualClock(), max_steps=3)


def test_manual_clock_refuses_to_go_back():
    with pytest.raises(ValueError):
        cp.ManualClock().advance(-1)


def test_batch_block_table():
    sched = cp.Scheduler(num_blocks=16, block_size=4, vocab_size=97, max_model_len=64, max_num_seqs=4)
    sched.add_request(1, list(range(9)), max_new_tokens=2)
    sched.add_request(2, [1, 2], max_new_tokens=2)
    plan = sched.step(0.0)
    table = batch_block_table(plan)
    assert table.shape == (2, 3) and table.flags.writeable
    assert (table[0] >= 0).all() and (table[1, 0] >= 0) and (table[1, 1:] == -1).all()
    assert np.array_equal(table, plan.block_table[plan.slots, :3])
