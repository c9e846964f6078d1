"""Chunked prefill by what else runs (SchedulerConfig.idle_chunk_size): large chunks when no decode
waits, chunk_size and max_num_batched_tokens whenever one does (the bound on a decode's stall)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import controlplane as cp
from controlplane.testing import reference_generate

from helpers import make, step

V = 97


def chunks(sched, model, now: float = 0.0, until=None):
    """Steps to the end (or until `until(plan)`); each step's (request ids, query lengths)."""
    out = []
    while sched.has_unfinished():
        plan, _ = step(sched, model, now)
        out.append((plan.req_ids.tolist(), plan.query_lens.tolist()))
        now += 1.0
        if until is not None and until(plan):
            break
    return out, now


def decode_waits(sched, ids) -> bool:
    """The rule's condition, from the outside: a running or swapped-out request has output and all
    but its last token computed (its next token is a decode)."""
    for rid in ids:
        try:
            r = sched.request_info(rid)
        except ValueError:  # finished
            continue
        running = r["state"] in ("PREFILLING", "DECODING")
        if (
            (running or r["swapped"])
            and r["num_tokens"] > r["num_prompt_tokens"]
            and r["num_computed_tokens"] + 1 == r["num_tokens"]
        ):
            return True
    return False


def test_a_lone_prompt_is_prefilled_in_idle_chunks_within_a_raised_budget():
    prompt = [k % V for k in range(1, 101)]
    sched, model = make(num_blocks=64, max_model_len=256, max_num_batched_tokens=16, chunk_size=8, idle_chunk_size=32)
    sched.add_request(1, prompt, max_new_tokens=3)
    got, _ = chunks(sched, model)
    # nobody decodes: 32-token chunks, the budget raised from 16 to 32; then its own decodes
    assert got == [([1], [32]), ([1], [32]), ([1], [32]), ([1], [4]), ([1], [1]), ([1], [1])]
    base, base_model = make(num_blocks=64, max_model_len=256, max_num_batched_tokens=16, chunk_size=8)
    base.add_request(1, prompt, max_new_tokens=3)
    before, _ = chunks(base, base_model)
    assert [q for _, q in before] == [[8]] * 12 + [[4], [1], [1]]


def test_a_running_decode_keeps_chunk_size_and_the_budget_until_it_finishes():
    sched, model = make(num_blocks=64, max_model_len=256, max_num_batched_tokens=16, chunk_size=8, idle_chunk_size=32)
    sched.add_request(1, [1, 2, 3, 4], max_new_tokens=5)
    plan, _ = step(sched, model, 0.0)  # A's prompt; A decodes from now on
    b = [k % V for k in range(10, 110)]
    sched.add_request(2, b, max_new_tokens=2, arrival_time=1.0)
    got, _ = chunks(sched, model, now=1.0)
    # A's 4 decodes each stall behind at most chunk_size (8) of B's tokens; once A is done, B is alone
    assert got == [([1, 2], [1, 8])] * 4 + [([2], [32]), ([2], [32]), ([2], [4]), ([2], [1])]


def test_a_swapped_out_decode_waits_too():
    # A (less important) decodes beside B's prefill until B's growth swaps A out; A is then a decode
    # waiting for its blocks, so B's last chunks stay at chunk_size (2), not idle_chunk_size (16).
    sched, model = make(
        num_blocks=20,
        num_host_blocks=16,
        preemption="swap",
        ordering="priority",
        max_num_batched_tokens=8,
        chunk_size=2,
        idle_chunk_size=16,
    )
    sched.add_request(1, [1, 2, 3], max_new_tokens=60, priority=1)
    step(sched, model, 0.0)
    sched.add_request(2, list(range(10, 70)), max_new_tokens=2, priority=0, arrival_time=1.0)
    now, swapped_steps, finished_a = 1.0, 0, False
    while sched.has_unfinished():
        a = sched.request_info(1) if not finished_a else None
        plan, done = step(sched, model, now)
        finished_a = finished_a or 1 in done
        now += 1.0
        if a is not None and a["swapped"]:
            swapped_steps += 1
            assert plan.query_lens.max() <= 2 and plan.num_tokens <= 8
    assert swapped_steps >= 3  # the scenario does swap A out while B still prefills
    assert sched.stats().num_preemptions_swap == 1


@pytest.mark.parametrize("idle", [1, 4, 8])
def test_idle_chunk_size_up_to_chunk_size_changes_nothing(idle):
    def run(**extra):
        sched, model = make(num_blocks=40, max_model_len=256, max_num_batched_tokens=6, chunk_size=8, **extra)
        for rid, n in enumerate([30, 7, 50, 3]):
            sched.add_request(rid, [(rid * 13 + k) % V for k in range(n)], max_new_tokens=4, arrival_time=0.0)
        return chunks(sched, model)[0]

    assert run(idle_chunk_size=idle) == run()


def test_bad_values_are_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="idle_chunk_size must be >= 0"):
        cp.Scheduler(idle_chunk_size=-1)
    with pytest.raises(ValueError, match="idle_chunk_size must be an int"):
        cp.SchedulerConfig(idle_chunk_size="big").to_core()
    core = cp.SchedulerConfig(idle_chunk_size=16384).to_core()
    assert core.idle_chunk_size == 16384 and cp.SchedulerConfig().idle_chunk_size == 0


# -- the property: random traffic, every plan checked against the rule -------------------------

ARRIVALS = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 60), st.integers(1, 8)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    arrivals=ARRIVALS,
    chunk=st.integers(1, 8),
    idle=st.sampled_from([0, 3, 12, 40]),
    budget=st.integers(1, 24),
    preemption=st.sampled_from(["recompute", "swap"]),
    num_blocks=st.integers(18, 40),
)
def test_no_step_exceeds_chunk_size_while_a_decode_is_in_the_batch(
    arrivals, chunk, idle, budget, preemption, num_blocks
):
    sched, model = make(
        num_blocks=num_blocks,
        max_model_len=80,
        max_num_batched_tokens=budget,
        chunk_size=chunk,
        idle_chunk_size=idle,
        preemption=preemption,
        num_host_blocks=24,
    )
    prompts = {}
    pending = sorted((t, rid, n, m) for rid, (t, n, m) in enumerate(arrivals))
    done, now, k = {}, 0.0, 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= k:
            _, rid, n, m = pending.pop(0)
            prompts[rid] = ([(rid * 7 + j) % V for j in range(n)], m)
            sched.add_request(rid, prompts[rid][0], max_new_tokens=m, arrival_time=now)
        live = [rid for rid in prompts if rid not in done]
        decoding = {rid for rid in live if sched.request_info(rid)["state"] == "DECODING"}
        idle_step = idle > chunk and not decode_waits(sched, live)
        plan, finished = step(sched, model, now)
        done.update(finished)
        q, ids = plan.query_lens.tolist(), plan.req_ids.tolist()
        if decoding & set(ids):  # a decode in the batch: its stall is bounded as without idle chunks
            assert max(q) <= chunk and plan.num_tokens <= budget
        if idle_step:
            assert max(q, default=0) <= idle and plan.num_tokens <= max(budget, idle)
        else:
            assert max(q, default=0) <= chunk and plan.num_tokens <= budget
        now, k = now + 1.0, k + 1
        assert k < 5000
    for rid, (prompt, m) in prompts.items():
        assert list(done[rid].output_token_ids) == reference_generate(prompt, m, V)


# -- the engine: the field, its auto default and its plans -----------------------------------------


def test_the_engine_takes_idle_chunk_size_and_resolves_auto_by_device(tmp_path):
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore

    from engine_helpers import write_tiny_config

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="idle_chunk_size must be (an int|>= 0)"):
            EngineConfig.from_dict({"idle_chunk_size": bad})
    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    prompt = [(7 * k) % 500 + 2 for k in range(300)]

    def run(**options):
        core = EngineCore(
            EngineConfig.from_dict(
                dict(model=path, load_format="dummy", device="cpu", chunk_size=32, max_num_batched_tokens=48, **options)
            )
        )
        core.add_request(0, prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        tokens = []
        while core.has_unfinished():
            out = core.step()
            tokens += [int(t) for t in out.tokens]
        return core, [row["num_tokens"] for row in core.profile], tokens

    auto, steps, tokens = run()  # auto on the CPU (torch prefill attention): chunk_size always
    assert auto.scheduler_config.idle_chunk_size == 0
    assert steps == [32] * 9 + [12, 1, 1, 1]
    idle, idle_steps, idle_tokens = run(idle_chunk_size=128)
    assert idle.scheduler_config.idle_chunk_size == 128
    assert idle_steps == [128, 128, 44, 1, 1, 1]  # alone: 128-token chunks, the budget raised from 48
    assert idle_tokens == tokens


def test_the_engine_states_a_chunks_cached_prefix_only_when_it_runs_alone(tmp_path):
    """The runner's hint to the prefill kernels (AttentionMetadata.prefill_cached_prefix, which lets a long
    chunk take cuDNN's attention, engine.kernels.cudnn_prompt): a step that is one request's chunk and nothing
    else states that chunk's cached prefix; a chunk beside decodes states none (a cuDNN plan must not stall
    them), nor does a step of several prefills."""
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    core = EngineCore(
        EngineConfig.from_dict(
            dict(
                model=path, load_format="dummy", device="cpu", chunk_size=32, max_num_batched_tokens=48,
                idle_chunk_size=128, enable_prefix_caching=True,
            )
        )
    )  # fmt: skip
    real = core.ops.prefill_attention
    calls = []

    def recorded(q, *args, **kwargs):
        if q.shape[0]:
            calls.append((q.shape[0], len(args[3]), kwargs.get("cached_prefix")))  # tokens, requests, hint
        return real(q, *args, **kwargs)

    core.ops._fns["prefill_attention"] = recorded

    def step():  # the step's prefill launch: (tokens, requests, hint), one per layer, all alike; None: none
        del calls[:]
        core.step()
        assert len(set(calls)) <= 1 and len(calls) in (0, core.model_config.num_layers), calls
        return calls[0] if calls else None

    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)  # noqa: E731
    a = [(7 * k) % 500 + 2 for k in range(300)]
    core.add_request(0, a, greedy(8))
    # its prompt alone: chunks of 128, 128 and 44 on 0, 128 and 256 cached tokens
    assert [step() for _ in range(3)] == [(128, 1, 0), (128, 1, 128), (44, 1, 256)]
    core.add_request(1, [(5 * k) % 500 + 3 for k in range(100)], greedy(2))  # beside request 0's decodes
    seen = []
    while core.has_unfinished():
        seen.append(step())
    assert [s for s in seen if s is not None] == [(32, 1, None)] * 3 + [(4, 1, None)], seen
    for rid in (2, 3):  # two prompts in one step: no hint
        core.add_request(rid, [(3 * k + rid) % 500 + 2 for k in range(20)], greedy(1))
    assert step() == (40, 2, None)
    core.add_request(4, a + [9, 9, 9], greedy(1))  # a prefix hit on request 0's cached blocks
    tokens, reqs, hint = step()
    assert reqs == 1 and hint == 303 - tokens and hint >= 256, (tokens, hint)
