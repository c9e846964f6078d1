"""experiments/bench_serving.py against a fake OpenAI-compatible server on loopback.

The fake streams one token per chunk after known delays (TTFT_S, then ITL_S per token), keeps a
prefix cache of every prompt + output it has served (usage.cached_tokens = the longest common
prefix with any of them) and logs every request, so the test can rebuild what the benchmark
should have sent and measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

try:  # the GPU machine's image lacks some of the serving stack's dependencies; only `-m gpu` runs there
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"serving dependencies missing: {exc}", allow_module_level=True)

from experiments import bench_serving as B
from sim.simulation import TokenFactory
from sim.workloads import make_workload

TTFT_S = 0.05
ITL_S = 0.01
VOCAB = 1000

AGENTIC = dict(
    num_prefixes=2,
    prefix_tokens_min=30,
    prefix_tokens_max=60,
    new_tokens_mean=10.0,
    new_tokens_max=40,
    output_mean=4.0,
    output_max=8,
    calls_mean=3.0,
    calls_max=6,
    tool_pause_median=0.3,
    tool_pause_p90=1.0,
    tool_pause_max=2.0,
    human_pause_prob=0.0,
    context_max=2000,
)
CHAT = dict(
    first_prompt_median=20.0,
    later_prompt_median=10.0,
    prompt_max=64,
    output_median=4.0,
    output_max=8,
    turns_mean=3.0,
    think_time_median=1.0,
    context_max=4000,
)


class FakeServer:
    """A streaming /v1/completions on a free loopback port, run by uvicorn in a thread."""

    def __init__(
        self,
        token_ids: bool = True,
        fail_on: tuple[int, ...] = (),
        report_cached: bool = True,
        report_vocab: bool = True,
        id_base: int = 0,
    ) -> None:
        self.token_ids, self.fail_on, self.report_cached = token_ids, set(fail_on), report_cached
        self.report_vocab, self.id_base = report_vocab, id_base  # output ids are id_base + [0, VOCAB)
        self.log: list[dict] = []  # per request: prompt, max_tokens, session_id, cached, output
        self.held: list[np.ndarray] = []  # what the fake prefix cache holds
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    async def models(self):
        entry = {"id": "fake", "max_model_len": 100_000, "vocab_size": self.id_base + VOCAB}
        if not self.report_vocab:  # as vLLM's /v1/models
            del entry["vocab_size"]
        return {"object": "list", "data": [entry]}

    def cached(self, prompt: np.ndarray) -> int:
        best = 0
        for seq in self.held:
            n = min(seq.size, prompt.size)
            differ = np.flatnonzero(seq[:n] != prompt[:n])
            best = max(best, int(differ[0]) if differ.size else n)
        return best

    async def completions(self, request: Request):
        body = await request.json()
        if len(self.log) + 1 in self.fail_on:
            self.log.append({"failed": True})
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        prompt = np.asarray(body["prompt"])
        n = body["max_tokens"]
        output = [self.id_base + (prompt.size * 7 + j) % VOCAB for j in range(n)]
        cached = self.cached(prompt)
        self.held.append(np.concatenate([prompt, output]))
        self.log.append(
            dict(
                prompt=prompt,
                max_tokens=n,
                session_id=body.get("session_id"),
                cached=cached,
                output=output,
                body={k: v for k, v in body.items() if k != "prompt"},
            )
        )
        usage = {
            "prompt_tokens": int(prompt.size),
            "completion_tokens": n,
            "total_tokens": int(prompt.size) + n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        if not self.report_cached:
            del usage["prompt_tokens_details"]

        async def chunks():
            await asyncio.sleep(TTFT_S)
            for j, token in enumerate(output):
                if j:
                    await asyncio.sleep(ITL_S)
                choice = {
                    "index": 0,
                    "text": "x",
                    "logprobs": {"tokens": ["x"], "token_logprobs": [-1.0]},
                    "finish_reason": "length" if j == n - 1 else None,
                }
                if self.token_ids:
                    choice["token_ids"] = [token]
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")


def expected_prompts(workload: str, params: dict, sessions: int, seed: int, log: list[dict], server_ids: bool):
    """{session_id: [expected prompt of each call]} as sim/simulation.py builds them, given what the fake
    returned; with synthetic outputs, only the prompt up to each call's new tokens can be checked."""
    tokens = TokenFactory(seed, VOCAB)
    by_session: dict[str, list[dict]] = {}
    for entry in log:
        by_session.setdefault(entry["session_id"], []).append(entry)
    out = {}
    for index, session in enumerate(make_workload(workload, params).sessions(sessions, seed)):
        rng = tokens.session_rng(index)
        context = tokens.prefix(session.prefix_id, session.prefix_tokens)
        prompts = []
        for k, turn in enumerate(session.turns):
            new = tokens.new_tokens(rng, turn)
            prompts.append(np.concatenate([context, new]))
            sent = by_session[session.session_id][k]
            previous_output = sent["output"] if server_ids else sent["prompt"][prompts[-1].size :][:0]
            context = np.concatenate([prompts[-1], previous_output]) if server_ids else None
            if not server_ids:  # the benchmark's own synthetic ids: take them from what it sent next
                nxt = by_session[session.session_id][k + 1]["prompt"] if k + 1 < len(session.turns) else None
                context = nxt[: prompts[-1].size + turn.output_tokens] if nxt is not None else prompts[-1]
        out[session.session_id] = prompts
    return out


def run(options: B.BenchOptions) -> B.BenchResult:
    return asyncio.run(B.run_benchmark(options))


def test_closed_loop_agentic_coding_replays_the_simulators_prompts_and_measures_the_stream(tmp_path):
    seed, sessions = 3, 4
    workload = make_workload("agentic_coding", AGENTIC).sessions(sessions, seed)
    with FakeServer(token_ids=True) as fake:
        result = run(
            B.BenchOptions(
                base_url=fake.url,
                workload="agentic_coding",
                params=AGENTIC,
                sessions=sessions,
                concurrency=2,
                seed=seed,
                pause_scale=0.05,
                slo_ttft_s=10.0,
                slo_tpot_s=1.0,
            )
        )
    s, log = result.summary, fake.log
    calls = sum(len(x.turns) for x in workload)
    outputs = sum(t.output_tokens for x in workload for t in x.turns)
    assert s["num_requests"] == len(log) == calls and s["num_sessions"] == sessions and s["completed"]
    assert s["num_errors"] == 0 and s["errors"] == {} and s["model"] == "fake" and s["vocab_size"] == VOCAB
    assert s["output_tokens"] == outputs == sum(e["max_tokens"] for e in log) and s["short_outputs"] == 0
    assert s["prompt_tokens"] == sum(e["prompt"].size for e in log)
    assert s["output_ids_from_server"] == calls and s["output_ids_synthetic"] == 0
    # every prompt is the simulator's: shared prefix, growing context with the server's own outputs
    expected = expected_prompts("agentic_coding", AGENTIC, sessions, seed, log, server_ids=True)
    by_session: dict[str, list] = {}
    for e in log:
        by_session.setdefault(e["session_id"], []).append(e["prompt"])
    assert by_session.keys() == expected.keys()
    for sid, prompts in expected.items():
        assert len(prompts) == len(by_session[sid])
        for want, got in zip(prompts, by_session[sid]):
            np.testing.assert_array_equal(got, want)
    assert all(
        e["body"]["ignore_eos"] and e["body"]["stream"] and e["body"]["stream_options"]["include_usage"] for e in log
    )
    # latencies are the fake's delays (client overhead on loopback is small)
    assert TTFT_S <= s["ttft_s_p50"] < TTFT_S + 0.05 and s["ttft_s_p99"] < TTFT_S + 0.2
    assert ITL_S * 0.9 <= s["tpot_s_p50"] < ITL_S * 3
    assert ITL_S * 0.9 <= s["itl_s_p50"] < ITL_S * 3
    assert s["per_user_tok_s_p50"] == pytest.approx(1 / s["tpot_s_p50"], rel=0.3)
    # the hit rate is the fake's cached tokens over prompt tokens, token-weighted; later turns hit
    assert s["prefix_hit_rate"] == pytest.approx(sum(e["cached"] for e in log) / s["prompt_tokens"])
    assert s["prefix_hit_rate"] > 0.5
    assert s["slo_attainment"] == 1.0
    table = result.requests
    assert list(table["cached_tokens"]) == [log[i]["cached"] for i in table["request_id"]]
    # pauses: the next call of a session arrives pause x scale after the previous one finished
    for session in workload:
        rows = table[table["session_id"] == session.session_id].sort_values("turn")
        gaps = rows["arrival"].to_numpy()[1:] - rows["finish"].to_numpy()[:-1]
        pauses = np.array([t.pause_after * 0.05 for t in session.turns[:-1]])
        assert (gaps >= pauses - 1e-3).all() and (gaps < pauses + 0.2).all()
    paths = B.write_outputs(result, tmp_path, plots=False)
    written = pd.read_csv(paths["requests"])
    assert len(written) == calls and "output_ids" in written.columns
    assert json.loads(paths["summary"].read_text())["num_requests"] == calls


def test_open_loop_chat_from_the_command_line_with_synthetic_outputs(tmp_path, capsys):
    seed, sessions, rate = 1, 5, 10.0
    workload = make_workload("chat", CHAT).sessions(sessions, seed, rate)
    with FakeServer(token_ids=False) as fake:
        summary = B.main(
            [
                "--base-url",
                fake.url,
                "--workload",
                "chat",
                "--sessions",
                str(sessions),
                "--session-rate",
                str(rate),
                "--seed",
                str(seed),
                "--pause-scale",
                "0",
                "--slo-ttft",
                "0.01",
                "--out",
                str(tmp_path),
                "--params",
                *[f"{k}={v}" for k, v in CHAT.items()],
            ]
        )
    out = capsys.readouterr().out
    assert "hit rate" in out and "TTFT s" in out and "endpoint" in out
    log = fake.log
    assert summary["num_requests"] == len(log) == sum(len(x.turns) for x in workload)
    assert summary["output_ids_synthetic"] == len(log) and summary["output_ids_from_server"] == 0
    assert summary["mode"] == "open" and summary["slo_attainment"] == 0.0  # TTFT > 10 ms always
    expected = expected_prompts("chat", CHAT, sessions, seed, log, server_ids=False)
    for session in workload:
        sent = [e["prompt"] for e in log if e["session_id"] == session.session_id]
        for k, (want, got) in enumerate(zip(expected[session.session_id], sent)):
            np.testing.assert_array_equal(got[: want.size], want)
            assert got.size == want.size
            if k:  # previous prompt + as many (synthetic) outputs as asked + the new tokens
                assert got.size == sent[k - 1].size + session.turns[k - 1].output_tokens + session.turns[k].new_tokens
                np.testing.assert_array_equal(got[: sent[k - 1].size], sent[k - 1])
    table = pd.read_csv(tmp_path / "requests.csv")
    firsts = table[table["turn"] == 0].set_index("session_id")["arrival"]
    for session in workload:  # the open-loop driver waits for each session's start time
        assert session.start_time - 1e-3 <= firsts[session.session_id] < session.start_time + 0.1
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["prefix_hit_rate"] == pytest.approx(sum(e["cached"] for e in log) / saved["prompt_tokens"])


def test_errors_are_counted_and_requests_bounded():
    params = dict(AGENTIC, calls_mean=4.0)
    with FakeServer(fail_on=(2,)) as fake:
        # seed 2: sessions of 4, 2, 5, ... calls, one at a time. Call 2 fails (session 0 ends there),
        # session 1 runs calls 3-4, session 2 gets call 5, then --max-requests stops it.
        result = run(
            B.BenchOptions(
                base_url=fake.url, params=params, sessions=6, concurrency=1, pause_scale=0, max_requests=5, seed=2
            )
        )
    s = result.summary
    assert s["errors"] == {"http_500": 1} and s["num_errors"] == 1
    assert s["requests_sent"] == 5 == len(fake.log) and s["num_requests"] == 4 and not s["completed"]
    assert s["cut_sessions"] == 2 and s["num_sessions"] == 1
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    result = run(B.BenchOptions(base_url=dead, params=AGENTIC, sessions=3, concurrency=3, seed=0))
    s = result.summary
    assert s["num_requests"] == 0 and s["num_errors"] == 3 and s["errors"]["ConnectError"] == 3
    assert s["vocab_size"] == B.DEFAULT_VOCAB_SIZE and s["model"] is None and not s["completed"]
    assert s["models_error"].startswith("ConnectError")
    assert "ttft_s_p50" not in s and B.format_details(s)


def test_the_run_timeout_cancels_what_is_in_flight():
    with FakeServer() as fake:
        start = time.perf_counter()
        # seed 2: session 0 has 4 calls of >= TTFT_S + 3 ITL_S each, longer than the timeout
        result = run(
            B.BenchOptions(
                base_url=fake.url,
                params=dict(AGENTIC, calls_mean=4.0),
                sessions=2,
                seed=2,
                concurrency=2,
                timeout_s=0.15,
                pause_scale=0,
            )
        )
        assert time.perf_counter() - start < 2.0
    s = result.summary
    assert s["timed_out"] and not s["completed"] and s["cancelled_requests"] >= 1
    assert s["requests_sent"] == s["num_requests"] + s["num_errors"] + s["cancelled_requests"]


def test_a_server_without_cached_tokens_has_no_hit_rate(tmp_path):
    with FakeServer(report_cached=False) as fake:
        result = run(
            B.BenchOptions(base_url=fake.url, params=AGENTIC, sessions=2, concurrency=2, seed=2, pause_scale=0)
        )
    s = result.summary
    assert s["num_requests"] == len(fake.log) > 2 and s["num_errors"] == 0
    assert math.isnan(s["prefix_hit_rate"]) and math.isnan(s["prefill_amplification"])
    assert result.requests["cached_tokens"].isna().all() and result.requests["computed_tokens"].isna().all()
    paths = B.write_outputs(result, tmp_path, plots=False)
    assert json.loads(paths["summary"].read_text())["prefix_hit_rate"] is None


def _check_next_prompts_hold_the_outputs(log: list[dict]) -> None:
    """Each call's prompt starts with the session's previous prompt and that call's output ids."""
    by_session: dict[str, list[dict]] = {}
    for e in log:
        by_session.setdefault(e["session_id"], []).append(e)
    for calls in by_session.values():
        for prev, nxt in zip(calls, calls[1:]):
            held = np.concatenate([prev["prompt"], prev["output"]])
            np.testing.assert_array_equal(nxt["prompt"][: held.size], held)


def test_a_server_that_does_not_report_its_vocabulary_still_gets_its_own_ids_back():
    # vLLM's /v1/models has no vocab_size: the 49152 default is then only where new ids are drawn
    # from, not a bound on the server's ids (before, every call with an id >= 49152 went synthetic).
    with FakeServer(report_vocab=False, id_base=B.DEFAULT_VOCAB_SIZE) as fake:
        result = run(
            B.BenchOptions(base_url=fake.url, params=AGENTIC, sessions=3, concurrency=3, seed=2, pause_scale=0)
        )
    s = result.summary
    assert s["num_requests"] == len(fake.log) > 3 and s["num_errors"] == 0
    assert (s["vocab_size"], s["vocab_size_source"]) == (B.DEFAULT_VOCAB_SIZE, "default")
    assert s["output_ids_from_server"] == s["num_requests"] and s["output_ids_synthetic"] == 0
    _check_next_prompts_hold_the_outputs(fake.log)
    # a vocabulary the server or the options give is a bound: ids beyond it are not the model's
    with FakeServer(report_vocab=False, id_base=B.DEFAULT_VOCAB_SIZE) as fake:
        s = run(
            B.BenchOptions(
                base_url=fake.url,
                params=AGENTIC,
                sessions=2,
                concurrency=2,
                seed=2,
                pause_scale=0,
                vocab_size=B.DEFAULT_VOCAB_SIZE,
            )
        ).summary
    assert s["vocab_size_source"] == "options" and s["output_ids_from_server"] == 0
    assert s["output_ids_synthetic"] == s["num_requests"] > 0


# Against our own server (a tiny random-weight model with Llama-3's vocabulary) ----------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("psutil")
    from serve_helpers import tiny_server

    with tiny_server(str(tmp_path_factory.mktemp("serve"))).running() as s:
        yield s


def test_against_our_server_every_call_reuses_the_servers_output_ids(tiny):
    # Issue #14: against our server with a vocabulary larger than 49152, every call fell back to synthetic
    # output ids. /v1/models did not report vocab_size, so the benchmark assumed 49152, drew its prompts
    # from that range and refused the server's ids >= 49152. Without the gateway fix this fails on
    # vocab_size (49152, "default"); with the benchmark's old range check as well, on the synthetic count.
    from serve_helpers import TINY_VOCAB

    block = 16  # the server's KV block size (EngineConfig.block_size)
    result = run(
        B.BenchOptions(base_url=tiny.url + "/v1", params=AGENTIC, sessions=3, concurrency=3, seed=2, pause_scale=0)
    )
    s = result.summary
    assert s["num_errors"] == 0 and s["completed"], (s["errors"], tiny.log_tail())
    assert (s["vocab_size"], s["vocab_size_source"], s["model"]) == (TINY_VOCAB, "server", "tiny-model")
    assert s["output_ids_from_server"] == s["num_requests"] == s["requests_sent"] > 3
    assert s["output_ids_synthetic"] == 0 and s["short_outputs"] == 0
    # the next call's prompt holds the previous output as the server made it, so its KV is reused: every
    # full block of the previous prompt + output (all but the last output token have KV) is a hit
    table = result.requests.sort_values(["session_id", "turn"])
    assert set(table["output_ids"]) == {"server"}
    for _, rows in table.groupby("session_id"):
        rows = rows.to_dict("records")
        for prev, nxt in zip(rows, rows[1:]):
            computed = prev["prompt_tokens"] + prev["output_tokens"] - 1
            assert nxt["cached_tokens"] >= block * (computed // block), (prev, nxt)


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"text": "ab", "token_ids": [5, 6]}, (2, [5, 6])),
        ({"text": "ab", "logprobs": {"tokens": ["token_id:5", "token_id:6"]}}, (2, [5, 6])),
        ({"text": "ab", "logprobs": {"tokens": ["a", "b"]}}, (2, None)),
        ({"text": "ab", "logprobs": None}, (1, None)),
        ({"text": "", "finish_reason": "length"}, (0, None)),
    ],
)
def test_chunk_tokens_reads_ids_where_the_server_gives_them(choice, expected):
    assert B.chunk_tokens(choice) == expected


def test_bad_options_fail_before_any_request():
    with pytest.raises(ValueError, match="unknown AgenticCodingConfig parameters"):
        run(B.BenchOptions(base_url="http://127.0.0.1:9/v1", params={"bogus": 1}))
    with pytest.raises(ValueError, match="concurrency"):
        B.BenchOptions(concurrency=0)
    assert math.isclose(B.BenchOptions().slo_tpot_s, 1 / 70)


def test_sessions_cut_by_max_model_len_are_reported_and_nothing_sent_fails(capsys):
    # Issue #19: against an 8K-context model agentic_coding's 20-60K-token prefixes never fit; the run
    # waited 85 s for the sessions' start times, sent nothing and exited 0 with a table of dashes.
    seed, sessions = 0, 4
    workload = make_workload("agentic_coding", AGENTIC).sessions(sessions, seed, 0.05)  # starts 0-100 s
    assert max(s.start_time for s in workload) > 10
    params = ["--params", *[f"{k}={v}" for k, v in AGENTIC.items()]]
    with FakeServer() as fake:
        start = time.perf_counter()
        with pytest.raises(SystemExit) as exit_info:  # every first call > 20 tokens: nothing is sent
            B.main(
                [
                    "--base-url",
                    fake.url,
                    "--sessions",
                    str(sessions),
                    "--session-rate",
                    "0.05",
                    "--max-model-len",
                    "20",
                    *params,
                ]
            )
        assert time.perf_counter() - start < 5  # no waiting for sessions that send nothing
        assert fake.log == []
    assert exit_info.value.code and "no call completed" in str(exit_info.value.code)
    err = capsys.readouterr().err
    turns = sum(len(s.turns) for s in workload)
    assert (
        f"warning: {sessions} of {sessions} sessions were cut short by max_model_len 20: {sessions} sent "
        f"nothing (their first call did not fit) and {turns} turns were not sent"
    ) in err
    # some sessions cut after their first calls: a warning with the counts, and the run succeeds
    prompts = [s.prefix_tokens + s.turns[0].new_tokens + s.turns[0].output_tokens for s in workload]
    limit = max(prompts) + 1
    with FakeServer() as fake:
        summary = B.main(
            [
                "--base-url",
                fake.url,
                "--sessions",
                str(sessions),
                "--concurrency",
                "2",
                "--pause-scale",
                "0",
                "--max-model-len",
                str(limit),
                *params,
            ]
        )
    err = capsys.readouterr().err
    assert summary["unsent_sessions"] == 0 and summary["num_requests"] == len(fake.log) >= sessions
    assert 0 < summary["truncated_sessions"] < sessions
    assert (
        f"{summary['truncated_sessions']} of {sessions} sessions were cut short by max_model_len {limit}: "
        f"0 sent nothing"
    ) in err
    assert summary["num_requests"] + summary["unsent_turns"] == turns
