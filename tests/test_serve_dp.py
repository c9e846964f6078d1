"""Data-parallel serving: N engine cores behind one gateway, routed by the simulator's router policies.

Parity: the same calls, in the same order, through the real gateway (a tiny random model on CPU) and
through the twin's cluster Router (experiments.bench_dp.TwinCluster) land on the same replicas, for
every built-in router, and find there the prefix hits the twin predicts. Then a core killed mid-request: 503
naming it, the others serve on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest

import controlplane as cp

from serve_helpers import (
    NUM_BLOCKS,
    TINY_TOKENIZER_SIZE,
    TINY_VOCAB,
    metrics,
    tiny_server,
    write_tiny_model,
)

REPLICA = "x-tandem-replica"
HOLD_TOKENS = 1800  # a held call outlives the whole trace (its max_model_len is 2048)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny-dp")))


def dp_server(tmp_path, model_dir, size: int, router: str, name: str):
    server = tiny_server(str(tmp_path), model_dir=model_dir, name=name)
    server.args += [f"data_parallel_size={size}", f"cluster.router={router}"]
    return server


def trace(seed: int = 0) -> list[tuple]:
    """Calls of three sessions sharing a 40-token system prefix (and one sharing nothing), turns interleaved,
    each turn's prompt its previous prompt plus 20 new tokens; two "hold" calls stay in flight (a load the routers
    see), a session ends and starts again. Ops: ("call", session, prompt), ("hold", prompt), ("end", session)."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return rng.integers(3, TINY_TOKENIZER_SIZE, size=n).tolist()

    system = ids(40)
    context = {s: system + ids(30) for s in ("a", "b", "c")}
    ops: list[tuple] = []
    for turn in range(4):
        for s in ("a", "b", "c"):
            context[s] = context[s] + ids(20)
            ops.append(("call", s, list(context[s])))
        if turn == 0:
            ops.append(("hold", ids(20)))
        if turn in (1, 2):  # a session sharing nothing: prefix_aware sends it by load
            context["d"] = context.get("d", ids(40)) + ids(20)
            ops.append(("call", "d", list(context["d"])))
        if turn == 1:
            ops.append(("end", "b"))
            context["b"] = system + ids(30)  # a new conversation under the same id
        if turn == 2:
            ops.append(("hold", ids(20)))
    ops.append(("call", None, system + ids(10)))  # no session: shares only the system prefix
    return ops


def twin_choices(ops, size: int, router: str) -> list[tuple[int, int | None]]:
    """(replica, cached prompt tokens) of each call, None for a held one's tokens."""
    from experiments.bench_dp import TwinCluster

    config = cp.SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=16, vocab_size=TINY_VOCAB, max_model_len=2048)
    twin, out = TwinCluster(size, router, config), []
    for op in ops:
        if op[0] == "call":
            replica, finished = twin.call(op[2], 2, op[1])
            out.append((replica, finished.num_cached_tokens))
        elif op[0] == "hold":
            out.append((twin.call(op[1], HOLD_TOKENS, None, wait=False)[0], None))
        else:
            twin.end_session(op[1])
    return out


def gateway_choices(url: str, ops) -> list[tuple[int, int | None]]:
    out = []
    with httpx.Client(timeout=120) as http, contextlib.ExitStack() as held:
        streams = []
        for op in ops:
            if op[0] == "call":
                body = {"prompt": op[2], "max_tokens": 2, "ignore_eos": True}
                if op[1]:
                    body["session_id"] = op[1]
                r = http.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out.append((int(r.headers[REPLICA]), r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]))
            elif op[0] == "hold":  # in flight from its first chunk on, until the end of the trace
                r = held.enter_context(
                    http.stream(
                        "POST",
                        url + "/v1/completions",
                        json={"prompt": op[1], "max_tokens": HOLD_TOKENS, "ignore_eos": True, "stream": True},
                    )
                )
                assert r.status_code == 200
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                streams.append(lines)
                out.append((int(r.headers[REPLICA]), None))
            else:
                assert http.post(f"{url}/v1/sessions/{op[1]}/end").status_code == 200
        for lines in streams:  # still running: the loads the routers saw were the twin's
            assert not any(
                json.loads(line[6:])["choices"][0]["finish_reason"]
                for line in [next(lines)]
                if line.startswith("data: {")
            ), "a held call finished during the trace"
    return out


@pytest.mark.parametrize(
    "router,size", [("round_robin", 2), ("least_loaded", 3), ("session_affinity", 2), ("prefix_aware", 3)]
)
def test_gateway_routes_as_the_twin(tmp_path, model_dir, router, size):
    ops = trace()
    expected = twin_choices(ops, size, router)
    replicas = [replica for replica, _ in expected]
    assert len(set(replicas)) > 1, f"a trace that exercises {router} uses more than one replica"
    with dp_server(tmp_path, model_dir, size, router, f"dp-{router}").running() as server:
        got = gateway_choices(server.url, ops)
        m = metrics(server.url)
    assert got == expected  # the same replicas, and there the same prefix hits
    routed = [m[f'tandem_replica_routed_total{{replica="{i}"}}'] for i in range(size)]
    assert routed == [replicas.count(i) for i in range(size)]
    assert "tandem_prompt_tokens_total" not in m  # per replica only: sum() in PromQL is the total
    assert sum(m[f'tandem_prompt_tokens_total{{replica="{i}"}}'] for i in range(size)) > 0


def _core_pids(server, size: int) -> dict[int, int]:
    text = server.log_tail(200_000)
    pids = {int(i): int(p) for i, p in re.findall(r"engine core replica (\d+) \(pid (\d+)\) ready", text)}
    assert sorted(pids) == list(range(size)), text[-3000:]
    return pids


def test_a_dead_core_fails_its_requests_and_the_others_serve_on(tmp_path, model_dir):
    with dp_server(tmp_path, model_dir, 2, "round_robin", "dp-dead").running() as server:
        pids = _core_pids(server, 2)
        url = server.url
        with httpx.Client(timeout=120) as http:
            r = http.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "session_id": "s0"})
            assert r.headers[REPLICA] == "0"
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # round robin: the second call goes to 1
                held = pool.submit(
                    http.post,
                    url + "/v1/completions",
                    json={"prompt": [8, 9, 10], "max_tokens": HOLD_TOKENS, "ignore_eos": True, "session_id": "s1"},
                )
                deadline = time.monotonic() + 30
                while metrics(url).get('tandem_replica_requests_in_flight{replica="1"}') != 1.0:
                    assert time.monotonic() < deadline and not held.done()
                    time.sleep(0.05)
                os.kill(pids[1], signal.SIGKILL)
                r = held.result()
            assert r.status_code == 503 and "replica 1" in r.json()["error"]["message"], r.text
            deadline = time.monotonic() + 10
            while metrics(url).get('tandem_replica_up{replica="1"}') != 0.0:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert http.get(url + "/health").status_code == 200
            for _ in range(3):  # only the live replica is routed to
                r = http.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
                assert (r.status_code, r.headers[REPLICA]) == (200, "0")
            r = http.post(url + "/v1/sessions/s1/end")
            assert r.status_code == 503 and "replica(s) 1" in r.json()["error"]["message"]
            assert http.post(url + "/v1/sessions/s0/end").status_code == 200
            assert http.post(url + "/v1/sessions/never/end").status_code == 404
            m = metrics(url)
            assert m['tandem_replica_up{replica="0"}'] == 1.0
            os.kill(pids[0], signal.SIGKILL)
        server.proc.wait(timeout=30)
        assert server.proc.returncode != 0


def test_prompt_block_hashes_are_the_hashes_the_core_caches_them_under():
    """The gateway's hashes of a prompt are the keys of the core's KV events, namespace included."""
    from controlplane import _core

    sched = cp.Scheduler(cp.SchedulerConfig(num_blocks=64, block_size=4, vocab_size=100))
    sched.record_kv_events()
    prompt = np.arange(1, 20, dtype=np.int32)  # 4 full blocks and 3 tokens
    sched.add_request(1, prompt, max_new_tokens=1, ignore_eos=True, arrival_time=0.0, cache_namespace="salt")
    while sched.has_unfinished():
        plan = sched.step(0.0)
        sched.commit(plan, np.full(plan.num_sampled, 5), 0.0)
    stored = [h for kind, hashes, _, _ in sched.drain_kv_events() if kind == "BlockStored" for h in hashes]
    assert _core.prompt_block_hashes(prompt, 4, "salt") == stored[:4]
    assert not set(_core.prompt_block_hashes(prompt, 4)) & set(stored)  # another namespace, other keys


def test_a_dead_core_keeps_the_others_positions_for_session_affinity():
    """The policy sees every core, dead ones too: a session stuck to replica 2 stays there when replica 0
    dies (with the live cores only, positions shifted and it moved to another core, losing its KV)."""
    import types

    from engine.serve.router import ReplicaRouter

    def stub(i):
        return types.SimpleNamespace(
            index=i,
            dead=False,
            in_flight=set(),
            stats={},
            num_routed=0,
            info=types.SimpleNamespace(num_blocks=100),
            cached_prefix_blocks=lambda hashes: 0,
        )

    clients = [stub(i) for i in range(3)]
    router = ReplicaRouter(clients, "session_affinity")
    for i in range(3):  # least loaded first: session s<i> sticks to replica i
        chosen = router.route(list(range(40)), f"s{i}")
        assert chosen.index == i
        chosen.in_flight.add(i)
    clients[0].dead = True
    assert router.route(list(range(40)), "s2").index == 2
    assert router.route(list(range(40)), "s1").index == 1
    assert router.route(list(range(40)), "s0").index == 1  # its core died: the least loaded live one
