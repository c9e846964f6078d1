"""Overlapped decode (engine/overlap.py) on the CPU: the same tokens as the strict loop, whatever happens.

A guess of the next decode step is launched before each step's tokens are back; it is used when the
scheduler's next plan is exactly that step and dropped otherwise. These tests force overlap on (on
CPU it is off by default: nothing runs asynchronously there) and check, against the same engine
with overlap off: tokens (greedy, seeded and unseeded sampling, min_tokens, logprobs), through
requests that stop early (an unpredicted end), arrive mid-decode, are aborted or preempted, and that
guesses were really used (or really dropped) where they should be.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import write_tiny_config


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("overlap"), "Qwen3ForCausalLM", vocab_size=1024)


def make_core(model_path, overlap: bool, **options):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    cfg = dict(
        model=model_path, load_format="dummy", device="cpu", num_gpu_blocks=96, block_size=4, overlap_decode=overlap
    )
    cfg.update(options)
    return EngineCore(EngineConfig.from_dict(cfg))


def drive(core, requests, events=()):
    """Runs requests [(id, prompt, params)] to the end; `events` = [(step index, callable(core))].

    Returns {id: tokens}, {id: logprob entries} and the runner's (guesses used, dropped)."""
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    events = dict(events)
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    step = 0
    while core.has_unfinished() or step in events:
        if step in events:
            events.pop(step)(core)
        if not core.has_unfinished():
            step += 1
            continue
        out = core.step()
        for k, (rid, tok) in enumerate(zip(out.req_ids.tolist(), out.tokens.tolist())):
            tokens.setdefault(rid, []).append(tok)
            if out.logprobs is not None:
                logprobs.setdefault(rid, []).append(round(float(out.logprobs[k]), 5))
        step += 1
    return tokens, logprobs, (core.runner.num_guesses_used, core.runner.num_guesses_dropped)


def prompts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1024, int(k)).tolist() for k in rng.integers(5, 40, n)]


def both(model_path, requests, events=(), **options):
    strict = drive(make_core(model_path, False, **options), requests, events)
    overlapped = drive(make_core(model_path, True, **options), requests, events)
    return strict, overlapped


@pytest.mark.parametrize("kind", ["greedy", "seeded", "unseeded", "mixed"])
def test_same_tokens_as_the_strict_loop(model_path, kind):
    from engine import SamplingParams

    def params(i):
        if kind == "greedy":
            return SamplingParams(temperature=0.0, max_tokens=12 + 3 * i, ignore_eos=True)
        if kind == "seeded":
            return SamplingParams(temperature=0.9, top_k=40, seed=i, max_tokens=12 + 3 * i, ignore_eos=True)
        if kind == "unseeded":
            return SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12 + 3 * i, ignore_eos=True)
        return SamplingParams(
            temperature=0.0 if i % 2 else 0.8, seed=i if i % 3 else None, min_tokens=6, max_tokens=20, logprobs=2
        )

    requests = [(i, p, params(i)) for i, p in enumerate(prompts(5))]
    (a, lp_a, (used_a, _)), (b, lp_b, (used, dropped)) = both(model_path, requests)
    assert a == b
    assert lp_a == lp_b
    assert used_a == 0
    # every decode step but the first (nothing to guess from: it follows a prefill) came from a guess,
    # and with only max_tokens ends (all foreseen) none was dropped
    decode_steps = max(len(t) for t in a.values()) - 1
    assert used == decode_steps - 1 and dropped == 0


def test_unforeseen_stop_keeps_the_rest_of_the_guess(model_path):
    """A request that stops on a stop token is not in the next plan: a greedy guess still serves the others."""
    from engine import SamplingParams

    ps = prompts(4, seed=3)
    free = [(i, p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)) for i, p in enumerate(ps)]
    first, _, _ = drive(make_core(model_path, False), free)
    stop = first[1][5]  # request 1 stops at its 6th token (or earlier, at the first occurrence)
    requests = [
        (
            i,
            p,
            SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop] if i == 1 else None, ignore_eos=True),
        )
        for i, p in enumerate(ps)
    ]
    (a, _, _), (b, _, (used, dropped)) = both(model_path, requests)
    assert a == b
    assert len(a[1]) <= 6 < len(a[0])
    assert dropped == 0 and used == 24 - 2


def test_unforeseen_stop_of_an_unseeded_sample_drops_the_guess(model_path):
    """Unseeded rows draw from the engine's generator, whose draws depend on the batch: no subset reuse."""
    from engine import SamplingParams

    ps = prompts(3, seed=4)
    free = [(i, p, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)) for i, p in enumerate(ps)]
    first, _, _ = drive(make_core(model_path, False), free)
    stop = first[0][4]
    requests = [
        (
            i,
            p,
            SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop] if i == 0 else None),
        )
        for i, p in enumerate(ps)
    ]
    (a, _, _), (b, _, (_, dropped)) = both(model_path, requests)
    assert a == b
    assert dropped == 1


def test_arrival_abort_and_preemption(model_path):
    """A request arriving mid-decode (the guess is dropped, its draws undone), one aborted, KV pressure."""
    from engine import SamplingParams

    ps = prompts(6, seed=5)
    sp = [SamplingParams(temperature=0.7, seed=10 + i, max_tokens=30, ignore_eos=True) for i in range(6)]
    requests = [(i, ps[i], sp[i]) for i in range(3)]
    late = (5, lambda core: core.add_request(3, ps[3], sp[3]))
    later = (11, lambda core: core.add_request(4, ps[4], sp[4]))
    abort = (17, lambda core: core.abort(1))
    # 40 blocks of 4 tokens for up to 4 requests of ~20 + 30 tokens: preemptions (recompute) on the way
    (a, _, _), (b, _, (used, dropped)) = both(model_path, requests, [late, later, abort], num_gpu_blocks=40)
    assert a == b
    assert dropped >= 2 and used > 20
    assert len(a[1]) < 30 and len(a[0]) == 30


def test_preemption_with_swap(model_path):
    from engine import SamplingParams

    ps = prompts(5, seed=6)
    requests = [(i, p, SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True)) for i, p in enumerate(ps)]
    (a, _, _), (b, _, (used, _)) = both(model_path, requests, num_gpu_blocks=36, preemption="swap", swap_space_gb=0.01)
    assert a == b and used > 10


def test_lookahead_block_lets_a_guess_cross_a_block_boundary(model_path):
    """With overlap on, the scheduler holds the block of each decoding request's next token."""
    from engine import SamplingParams

    core = make_core(model_path, True)
    assert core.scheduler_config.num_lookahead_tokens == 1
    assert make_core(model_path, False).scheduler_config.num_lookahead_tokens == 0
    core.add_request(0, list(range(1, 8)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    seen_boundary = False
    while core.has_unfinished():
        core.step()
        if not core.has_unfinished():
            break
        info = core.scheduler.request_info(0)
        computed = info["num_computed_tokens"]
        held = len(info["blocks"])
        assert held >= -(-computed // 4)
        if computed % 4 == 0:  # its next token starts a block: that block is already its own
            assert held == computed // 4 + 1
            seen_boundary = True
        core.scheduler.check_invariants()
    assert seen_boundary
    assert core.runner.num_guesses_dropped == 0 and core.runner.num_guesses_used == 18


def test_overlap_decode_config_is_validated():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="overlap_decode"):
        EngineConfig(overlap_decode="yes")
