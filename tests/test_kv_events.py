"""KV cache events (engine/kv_events.py, docs/kv-events.md): the stream an engine publishes, decoded by
the consumer example of the doc, rebuilds exactly the prefix index's own set of cached block hashes;
sequence numbers are contiguous; replay resends what a subscriber missed; events off publish nothing
and change no token.
"""

from __future__ import annotations

import re
import sys
import time
import types
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

import controlplane as cp

from engine_helpers import write_tiny_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "kv-events.md"
BLOCK = 4


def doc_consumer() -> dict:
    """The namespace of the doc's consumer example (its python block that defines EngineCacheView)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    (code,) = [b for b in blocks if "class EngineCacheView" in b]
    module = types.ModuleType("kv_events_consumer")  # a module, as a script run by itself is one
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.__dict__


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("kv_events"), "Qwen3ForCausalLM", vocab_size=256)


def endpoints(tmp_path) -> dict:
    return {
        "enable_kv_cache_events": True,
        "endpoint": f"ipc://{tmp_path}/kv.sock",
        "replay_endpoint": f"ipc://{tmp_path}/replay.sock",
        "buffer_steps": 100_000,
    }


def make_core(model_path, kv_events=None, num_gpu_blocks=24):
    from engine.config import EngineConfig
    from engine.core import EngineCore

    return EngineCore(
        EngineConfig.from_dict(
            dict(
                model=model_path,
                load_format="dummy",
                device="cpu",
                num_gpu_blocks=num_gpu_blocks,
                block_size=BLOCK,
                max_num_seqs=4,
                kv_events=kv_events,
            )
        ),
        clock=cp.ManualClock(),
    )


def workload(seed: int = 0) -> list[tuple[int, list[int]]]:
    """Prompts in families sharing long prefixes, more of them than the cache holds (evictions)."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(2, 256, size=n).tolist() for n in (13, 21, 9)]
    out = []
    for rid in range(18):
        head = heads[rid % len(heads)]
        out.append((rid, head + rng.integers(2, 256, size=int(rng.integers(1, 11))).tolist()))
    return out


def run(core, requests, after_step=lambda: None) -> dict[int, list[int]]:
    """Admits requests two at a time, steps to the end; {id: tokens}."""
    from engine import SamplingParams

    tokens: dict[int, list[int]] = {}
    pending = list(requests)
    while pending or core.has_unfinished():
        for _ in range(2):
            if pending:
                rid, prompt = pending.pop(0)
                core.add_request(rid, prompt, SamplingParams(max_tokens=6, ignore_eos=True))
        out = core.step()
        for rid, tok in zip(out.req_ids.tolist(), out.tokens.tolist()):
            tokens.setdefault(rid, []).append(tok)
        after_step()
    return tokens


def follow_until(view, publisher, timeout: float = 10.0) -> None:
    """Polls the view until it applied every batch the publisher sent."""
    assert publisher.wait_sent(timeout)
    deadline = time.monotonic() + timeout
    while view.next_seq < publisher.num_published and time.monotonic() < deadline:
        if not view.poll(50) and view.next_seq < publisher.num_published:
            view.catch_up()
    assert view.next_seq == publisher.num_published


def test_stream_rebuilds_the_prefix_index_with_contiguous_sequence_numbers(model_path, tmp_path):
    ns = doc_consumer()
    core = make_core(model_path, endpoints(tmp_path))
    view = ns["EngineCacheView"](core.kv_events.config.endpoint, core.kv_events.config.replay_endpoint)
    checked = []

    def check():  # after every step: the consumer's set is the index's own
        follow_until(view, core.kv_events)
        assert view.hashes == set(core.scheduler.cached_block_hashes())
        checked.append(len(view.hashes))

    try:
        run(core, workload(), check)
        stats = core.scheduler.stats()
        assert stats.num_evicted_blocks > 0 and stats.cached_tokens > 0  # evictions and prefix hits happened
        assert max(checked) > 0
        assert view.applied == list(range(core.kv_events.num_published))  # contiguous from 0
        assert core.kv_events.num_dropped == 0
    finally:
        view.close()
        core.close()


def replay(core, start: int, end_marker: bytes) -> list[tuple[int, bytes]]:
    """(sequence number, payload) of every batch the replay socket resends from `start`, up to its end marker."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(core.kv_events.config.replay_endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    try:
        while True:
            assert dealer.poll(5000)
            empty, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == end_marker:
                assert payload == b""
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        dealer.close(linger=0)


def test_replay_resends_missed_batches_then_the_end_marker(model_path, tmp_path):
    ns = doc_consumer()
    core = make_core(model_path, endpoints(tmp_path))
    try:
        run(core, workload(1))
        assert core.kv_events.wait_sent()
        n = core.kv_events.num_published
        assert n > 3
        for start in (0, n - 2):
            assert [seq for seq, _ in replay(core, start, ns["END_OF_REPLAY"])] == list(range(start, n))
        # a view that saw nothing live rebuilds the index from the replay alone
        view = ns["EngineCacheView"](core.kv_events.config.endpoint, core.kv_events.config.replay_endpoint)
        view.catch_up()
        assert view.next_seq == n
        assert view.hashes == set(core.scheduler.cached_block_hashes())
        view.close()
    finally:
        core.close()


def test_batches_are_vllm_shaped(model_path, tmp_path):
    """Array form: [ts, [[tag, fields...], ...], rank]; stored chains carry their tokens and block size."""
    ns = doc_consumer()
    core = make_core(model_path, endpoints(tmp_path))
    try:
        run(core, workload(2))
        assert core.kv_events.wait_sent()
        raw = [msgspec.msgpack.decode(payload) for _, payload in replay(core, 0, ns["END_OF_REPLAY"])]
        assert raw[0][1] == [["AllBlocksCleared"]] and raw[0][2] == 0
        kinds = set()
        for ts, events, rank in raw:
            assert isinstance(ts, float) and rank == 0
            for event in events:
                kinds.add(event[0])
                if event[0] == "BlockStored":
                    _, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = event
                    assert block_size == BLOCK and len(token_ids) == BLOCK * len(hashes)
                    assert (lora_id, medium, lora_name) == (None, "GPU", None)
                    assert parent is None or 0 <= parent < 2**64
                elif event[0] == "BlockRemoved":
                    assert len(event) == 3 and event[2] == "GPU" and event[1]
        assert kinds == {"AllBlocksCleared", "BlockStored", "BlockRemoved"}
    finally:
        core.close()


def test_events_off_publish_nothing_and_change_no_token(model_path, tmp_path):
    ns = doc_consumer()
    off = make_core(model_path)
    assert off.kv_events is None and not off.scheduler.recording_kv_events
    view = ns["EngineCacheView"](f"ipc://{tmp_path}/kv.sock")  # where an engine with events on would publish
    tokens_off = run(off, workload(3))
    assert not view.poll(200) and view.next_seq == 0
    view.close()
    assert off.scheduler.drain_kv_events() == []

    on = make_core(model_path, endpoints(tmp_path))
    try:
        assert on.scheduler.recording_kv_events
        assert run(on, workload(3)) == tokens_off
        assert on.scheduler.stats().as_dict() == off.scheduler.stats().as_dict()
    finally:
        on.close()
    assert not on.scheduler.recording_kv_events


def test_reset_tells_subscribers_the_cache_is_empty(model_path, tmp_path):
    ns = doc_consumer()
    core = make_core(model_path, endpoints(tmp_path))
    view = ns["EngineCacheView"](core.kv_events.config.endpoint, core.kv_events.config.replay_endpoint)
    try:
        run(core, workload(4))
        follow_until(view, core.kv_events)
        assert view.hashes
        core.reset(clock=cp.ManualClock())
        follow_until(view, core.kv_events)
        assert view.hashes == set() == set(core.scheduler.cached_block_hashes())
        run(core, workload(5))
        follow_until(view, core.kv_events)
        assert view.hashes == set(core.scheduler.cached_block_hashes()) != set()
    finally:
        view.close()
        core.close()


def test_map_wire_format_tags_events_by_type():
    from engine.kv_events import encode_batch

    stored = ("BlockStored", [7, 2**64 - 1], None, list(range(8)))
    payload = encode_batch(
        [stored, ("BlockRemoved", [7], None, []), ("AllBlocksCleared", [], None, [])], 4, "map", 1.5, 0
    )
    assert msgspec.msgpack.decode(payload) == [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [7, 2**64 - 1],
                "parent_block_hash": None,
                "token_ids": list(range(8)),
                "block_size": 4,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            },
            {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"},
            {"type": "AllBlocksCleared"},
        ],
        0,
    ]
    array = msgspec.msgpack.decode(encode_batch([stored], 4, "array", 1.5, 0))
    assert array == [1.5, [["BlockStored", [7, 2**64 - 1], None, list(range(8)), 4, None, "GPU", None]], 0]


def test_config_checks():
    from engine.kv_events import KVEventsConfig, make_publisher

    with pytest.raises(ValueError, match="unknown kv_events config keys"):
        KVEventsConfig.from_value({"enable_kv_cache_events": True, "port": 5557})
    with pytest.raises(ValueError, match="wire_format"):
        KVEventsConfig(wire_format="json")
    assert make_publisher(None, BLOCK) is None
    assert make_publisher({"enable_kv_cache_events": False}, BLOCK) is None
    assert make_publisher({"enable_kv_cache_events": True, "publisher": "null"}, BLOCK) is None


def test_scheduler_records_chains_and_evictions():
    """The control plane's own record: one stored chain per request and step (parent None at a sequence's
    start, the previous block's hash after), evictions as removals, nothing while not recording."""
    s = cp.Scheduler(
        num_blocks=6,
        block_size=BLOCK,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        chunk_size=64,
        max_model_len=64,
        vocab_size=100,
    )
    rng = np.random.default_rng(0)
    now = 0.0

    def serve(rid, prompt):
        nonlocal now
        s.add_request(rid, prompt, max_new_tokens=2, ignore_eos=True, arrival_time=now)
        while s.has_unfinished():
            plan = s.step(now)
            s.commit(plan, np.zeros(plan.num_sampled, dtype=np.int64), now)
            now += 1.0

    serve(0, rng.integers(0, 100, size=9))
    assert s.drain_kv_events() == []  # not recording
    s.record_kv_events()
    prompt = rng.integers(0, 100, size=13).tolist()
    serve(1, prompt)
    (event,) = s.drain_kv_events()
    kind, hashes, parent, tokens = event
    assert kind == "BlockStored" and parent is None and tokens == prompt[:12] and len(hashes) == 3
    assert set(hashes) <= set(s.cached_block_hashes())
    serve(2, prompt + rng.integers(0, 100, size=6).tolist())  # extends the cached chain
    events = s.drain_kv_events()
    stored = [e for e in events if e[0] == "BlockStored"]
    assert stored[0][2] == hashes[-1]  # its first new block's parent is the cached chain's last
    held = set(s.cached_block_hashes())
    serve(3, rng.integers(0, 100, size=21).tolist())  # needs 6 blocks: evicts the cache
    events = s.drain_kv_events()
    removed = {h for e in events if e[0] == "BlockRemoved" for h in e[1]}
    assert removed and removed <= held | {h for e in stored for h in e[1]}
    s.check_invariants()


def test_data_parallel_cores_publish_on_endpoints_of_their_own():
    """With data_parallel_size=N every core gets its rank and its own endpoints (a TCP port + rank, as vLLM
    offsets them): before, every core bound the same port and the second one failed to start."""
    from engine.kv_events import KVEventsConfig
    from engine.serve.__main__ import _rank_options

    options = {
        "model": "x",
        "kv_events": {"enable_kv_cache_events": True, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600"},
    }
    ranks = [KVEventsConfig.from_value(_rank_options(options, r, 3)["kv_events"]) for r in range(3)]
    assert [c.endpoint for c in ranks] == ["tcp://*:5557", "tcp://*:5558", "tcp://*:5559"]
    assert [c.replay_endpoint for c in ranks] == ["tcp://*:5600", "tcp://*:5601", "tcp://*:5602"]
    assert [c.data_parallel_rank for c in ranks] == [0, 1, 2]
    assert KVEventsConfig(endpoint="ipc:///tmp/kv").for_rank(2).endpoint == "ipc:///tmp/kv-dp2"
    assert _rank_options(options, 0, 1) is options  # one core: as configured
    with pytest.raises(ValueError, match="TCP port"):
        KVEventsConfig(endpoint="tcp://host").for_rank(1)
