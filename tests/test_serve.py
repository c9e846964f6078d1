"""The OpenAI-compatible server end to end: `python -m engine.serve` subprocesses with SmolLM2-135M on CPU.

Two servers: a plain one for almost everything, then one with an API key that the last test kills
(engine-core death). Generations are short: every step of the 135M model costs ~0.1-0.3 s on CPU.

Golden texts come from SmolLM2-135M-Instruct greedy decoding:
    "1, 2, 3, 4,"  -> " 5, 6, 7, 8, 9, ..."  (tokens " ", "5", ",", " ", "6", ...)
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
import uuid

import pytest

openai = pytest.importorskip("openai")  # not on the GPU machine, where only `-m gpu` runs
pytest.importorskip("psutil")

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402

from serve_helpers import (  # noqa: E402
    REQUESTS,
    TINY_BYTE0,
    TINY_TOKENIZER_SIZE,
    TINY_VOCAB,
    VOCAB,
    ServerProcess,
    is_openai_error,
    load_round,
    metrics,
    sse_events,
    tiny_server,
    wait_idle,
    write_tiny_model,
)

COUNT = "1, 2, 3, 4,"
COUNT_IDS = [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28]  # COUNT in SmolLM2's tokenizer
SIX_ID = 38  # "6"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BLOCK = 16

pytestmark = pytest.mark.slow


# Servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), name="plain").running() as s:
        print(f"server log: {s.log_path}")
        yield s


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    keyed = ServerProcess(str(tmp_path_factory.mktemp("serve")), overrides=("api_key=sk-test-123",), name="keyed")
    with keyed.running() as s:
        yield s


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=180.0, max_retries=0)


def post(server, path: str, body=None, raw: bytes | None = None, timeout: float = 180.0, headers=None):
    if raw is None:
        raw = json.dumps(body).encode()
    return httpx.post(
        server.url + path, content=raw, timeout=timeout, headers={"content-type": "application/json", **(headers or {})}
    )


# The official client ---------------------------------------------------------------------------


def test_models_lists_the_served_model(server, client, model_name):
    listed = client.models.list().data
    assert [m.id for m in listed] == [model_name]
    assert model_name.startswith("SmolLM2-135M-Instruct")
    raw = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 8192
    assert raw["data"][0]["vocab_size"] == VOCAB  # the model's (the core's), for clients that send token ids


def test_chat_france_question_answers_paris(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=FRANCE, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens < 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_stream_matches_non_stream(client, model_name):
    full = client.completions.create(model=model_name, prompt=COUNT, temperature=0, max_tokens=8)
    assert full.choices[0].text == " 5, 6, 7"
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(COUNT_IDS), 8)

    chunks = list(client.completions.create(model=model_name, prompt=COUNT, temperature=0, max_tokens=8, stream=True))
    assert all(c.usage is None for c in chunks)  # not asked for
    assert "".join(c.choices[0].text for c in chunks) == " 5, 6, 7"
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_chat_stream_matches_non_stream(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=FRANCE, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(model=model_name, messages=FRANCE, temperature=0, max_tokens=24, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == full.choices[0].finish_reason == "stop" and set(reasons[:-1]) == {None}


def test_n2_gives_two_choices_and_counts_the_prompt_once(client, model_name):
    r = client.completions.create(
        model=model_name, prompt=COUNT, n=2, temperature=1.0, seed=11, max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(COUNT_IDS), 12)

    one = client.chat.completions.create(model=model_name, messages=FRANCE, max_tokens=1)
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=FRANCE,
            n=2,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [(0, "length"), (1, "length")]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    assert usage.prompt_tokens == one.usage.prompt_tokens


def test_stop_string_spanning_tokens_ends_the_text_before_it(client, model_name):
    # ", 7" is three tokens: ",", " ", "7"; the text must end before it, and the 8 tokens up to "7" are counted
    r = client.completions.create(model=model_name, prompt=COUNT, temperature=0, max_tokens=16, stop=", 7")
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" 5, 6", "stop")
    assert r.usage.completion_tokens == 8

    chunks = list(
        client.completions.create(
            model=model_name, prompt=COUNT, temperature=0, max_tokens=16, stop=[", 7", "never"], stream=True
        )
    )
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == " 5, 6" and not any("7" in t for t in texts)
    assert chunks[-1].choices[0].finish_reason == "stop"

    r = client.completions.create(
        model=model_name,
        prompt=COUNT,
        temperature=0,
        max_tokens=16,
        stop=", 7",
        extra_body={"include_stop_str_in_output": True},
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" 5, 6, 7", "stop")


def test_chat_stop_string(client, model_name):
    ref = client.chat.completions.create(model=model_name, messages=FRANCE, temperature=0, max_tokens=24)
    answer = ref.choices[0].message.content
    r = client.chat.completions.create(model=model_name, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"])
    assert r.choices[0].message.content == answer[: answer.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_completion_logprobs_greedy(client, model_name):
    r = client.completions.create(model=model_name, prompt=COUNT, temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == r.choices[0].text
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and all(v <= 0 for v in top.values()) and logprob <= 0
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy: the best


def test_completion_logprobs_sampled(client, model_name):
    r = client.completions.create(
        model=model_name,
        prompt="The weather today is",
        temperature=1.0,
        seed=5,
        max_tokens=8,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 2 and all(v <= 0 for v in top.values())
        assert logprob <= max(top.values()) + 1e-5
        if token in top:
            assert top[token] == pytest.approx(logprob)


def test_chat_logprobs(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=FRANCE, temperature=0, max_tokens=24, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
        best = entry.top_logprobs[0]
        assert (entry.token, entry.logprob) == (best.token, pytest.approx(best.logprob))  # greedy
        assert entry.bytes == list(entry.token.encode("utf-8"))
    assert r.choices[0].message.content.startswith("".join(e.token for e in content[:3]))


def _long_prompt(tag: str) -> str:
    body = " ".join(
        f"Fact {i}: the {w} is a useful thing to know about."
        for i, w in enumerate(
            [
                "river",
                "mountain",
                "forest",
                "desert",
                "ocean",
                "valley",
                "glacier",
                "canyon",
                "island",
                "volcano",
                "prairie",
                "swamp",
            ]
        )
    )
    return f"[{tag}] {body}\nQuestion: which fact mentions the ocean?"


def test_usage_reports_cached_prefix_tokens(client, model_name):
    prompt = _long_prompt(uuid.uuid4().hex)
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 8 * BLOCK and second.usage.prompt_tokens == n
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # every full block but the one holding the last prompt token (its logits must be computed again)
    assert second.usage.prompt_tokens_details.cached_tokens == BLOCK * ((n - 1) // BLOCK)


def test_cache_salt_isolates_the_prefix_cache(client, model_name):
    prompt = _long_prompt(uuid.uuid4().hex)

    def cached(salt):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, extra_body={"cache_salt": salt})
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # same text, other namespace: nothing shared
    assert cached("tenant-a") > 0


def test_stream_options_include_usage(client, model_name):
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=COUNT,
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_usage = [i for i, c in enumerate(chunks) if c.usage is not None]
    assert with_usage == [len(chunks) - 1]
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (11, 5, 16)
    assert last.usage.prompt_tokens_details.cached_tokens >= 0


def test_seed_reproduces_samples_at_temperature_1(client, model_name):
    def sample(seed, prompt="Once upon a time"):
        r = client.completions.create(
            model=model_name, prompt=prompt, temperature=1.0, seed=seed, max_tokens=12, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text

    a = sample(1234)
    assert sample(1234) == a
    assert sample(4321) != a
    # a seeded request draws from its own generator: batching it with unseeded traffic changes nothing
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [
            pool.submit(
                client.completions.create, model=model_name, prompt=f"Story {i}:", temperature=1.0, max_tokens=12
            )
            for i in range(3)
        ]
        seeded = pool.submit(sample, 1234)
        assert seeded.result() == a
        for f in others:
            f.result()


def test_extra_body_sampling_fields(client, model_name):
    def text(**extra):
        r = client.completions.create(
            model=model_name, prompt=COUNT, max_tokens=8, temperature=1.5, seed=3, extra_body=extra
        )
        return r.choices[0].text

    assert text(top_k=1) == " 5, 6, 7"  # only the best token survives
    assert text(min_p=1.0) == " 5, 6, 7"  # only tokens as likely as the best survive
    greedy_penalised = (
        client.completions.create(
            model=model_name, prompt=COUNT, max_tokens=8, temperature=0, extra_body={"repetition_penalty": 3.0}
        )
        .choices[0]
        .text
    )
    assert greedy_penalised != " 5, 6, 7"  # ",", " " and the digits were seen: penalised away

    r = client.chat.completions.create(
        model=model_name,
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
        extra_body={"ignore_eos": True, "session_id": "extra-body", "cache_salt": "s"},
    )
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 24)


def test_stop_token_ids(client, model_name):
    plain = client.completions.create(model=model_name, prompt=COUNT_IDS, temperature=0, max_tokens=8)
    assert plain.choices[0].text == " 5, 6, 7"  # the ids are COUNT
    r = client.completions.create(
        model=model_name, prompt=COUNT_IDS, temperature=0, max_tokens=16, extra_body={"stop_token_ids": [SIX_ID]}
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 5  # " ", "5", ",", " ", "6"
    assert r.choices[0].text == " 5, 6"  # a stop token that is not special stays in the text (as vLLM)


# Bad input -------------------------------------------------------------------------------------

_TOO_LONG = [COUNT_IDS[0]] * 9000
BAD_REQUESTS = [  # (path, body or raw bytes, the parameter the error must name)
    ("/v1/completions", b'{"prompt": "hi", ', None),
    ("/v1/chat/completions", b"not json at all", None),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": FRANCE}, "model"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": FRANCE, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/v1/chat/completions", {"messages": FRANCE, "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": FRANCE, "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": FRANCE, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8192}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/chat/completions", {"messages": FRANCE, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": _TOO_LONG, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, VOCAB], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [-1]], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, "prompt"),
]


def test_bad_requests_get_400_with_openai_errors_and_schedule_nothing(server):
    before = wait_idle(server.url)
    failures = []
    for path, body, param in BAD_REQUESTS:
        r = post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
        payload = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code != 400 or not is_openai_error(payload) or payload["error"]["param"] != param:
            failures.append((path, str(body)[:80], r.status_code, payload))
    assert not failures, "\n".join(map(str, failures))
    too_long = post(server, "/v1/completions", {"prompt": _TOO_LONG, "max_tokens": 1}).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and too_long["type"] == "invalid_request_error"
    assert post(server, "/v1/completions", {"model": "x", "prompt": "a"}).json()["error"]["code"] == "model_not_found"
    time.sleep(1.2)  # the core sends its counters every 0.5 s
    after = metrics(server.url)
    for name in ("tandem_prompt_tokens_total", "tandem_generation_tokens_total"):
        assert after[name] == before[name], name
    assert after["tandem_kv_cache_used_blocks"] == 0


# Bugs found by these tests and fixed: each test pins its fix.


@pytest.mark.parametrize(
    "field,value",
    [("seed", 2**64), ("priority", 2**70), ("top_k", 2**70), ("min_tokens", 2**70), ("stop_token_ids", [2**70])],
)
def test_integers_beyond_64_bits_get_400(server, field, value):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, field: value})
    assert r.status_code == 400 and is_openai_error(r.json()) and r.json()["error"]["param"] == field


def test_chat_text_part_that_is_not_a_string_gets_400(server):
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}], "max_tokens": 1},
    )
    assert r.status_code == 400 and is_openai_error(r.json())


@pytest.mark.parametrize(
    "path,raw",
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 1}'),
    ],
)
def test_lone_surrogate_gets_400(server, path, raw):
    r = post(server, path, raw=raw)
    assert r.status_code == 400 and is_openai_error(r.json())


@pytest.mark.parametrize(
    "method,path,raw,status",
    [
        ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),  # RecursionError
        ("GET", "/v1/completions", None, 405),
        ("POST", "/v1/no-such-route", b"{}", 404),
    ],
)
def test_every_error_has_the_openai_body(server, method, path, raw, status):
    r = httpx.request(method, server.url + path, content=raw, timeout=60, headers={"content-type": "application/json"})
    assert r.status_code == status and is_openai_error(r.json())


def test_out_of_vocabulary_stop_token_id_names_its_parameter(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "stop_token_ids": [VOCAB]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_max_completion_tokens_zero_gets_400(server):
    r = post(server, "/v1/chat/completions", {"messages": FRANCE, "max_completion_tokens": 0, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_logprobs_only_for_requests_that_ask_for_them(server, client, model_name):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        wants = pool.submit(
            client.completions.create,
            model=model_name,
            prompt=COUNT,
            max_tokens=16,
            logprobs=5,
            extra_body={"ignore_eos": True},
        )
        time.sleep(0.5)
        plain = pool.submit(
            client.completions.create, model=model_name, prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True}
        )
        one = pool.submit(
            client.completions.create,
            model=model_name,
            prompt="Hey",
            max_tokens=8,
            logprobs=1,
            extra_body={"ignore_eos": True},
        )
        assert len(wants.result().choices[0].logprobs.top_logprobs[0]) == 5
        assert plain.result().choices[0].logprobs is None
        assert all(len(top) == 1 for top in one.result().choices[0].logprobs.top_logprobs)


# Fuzzing ---------------------------------------------------------------------------------------


def _check_stream(r) -> None:
    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events, "an empty stream"
    if events[-1] != "[DONE]":  # a request the core refused after the stream began ends with an error event
        assert is_openai_error({"error": {"param": None, "code": None, **json.loads(events[-1])["error"]}})
    for e in events[:-1]:
        assert "choices" in json.loads(e)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(request=REQUESTS)
def test_fuzzed_bodies_never_get_5xx_and_every_4xx_has_the_error_body(server, request):
    path, body = request
    raw = json.dumps(body).encode()  # allow_nan: NaN and Infinity go out as JS literals, as some clients send them
    note(f"{path} {raw[:400]!r}")
    with httpx.stream(
        "POST", server.url + path, content=raw, timeout=120, headers={"content-type": "application/json"}
    ) as r:
        assert r.status_code < 500, r.read()
        if r.status_code >= 400:
            assert is_openai_error(json.loads(r.read())), r.read()
        elif r.headers["content-type"].startswith("text/event-stream"):
            _check_stream(r)
        else:
            out = json.loads(r.read())
            assert out["choices"] and all(c["finish_reason"] in ("stop", "length") for c in out["choices"])


def test_server_is_healthy_after_fuzzing(server, client, model_name):
    r = client.completions.create(model=model_name, prompt=COUNT, temperature=0, max_tokens=8)
    assert r.choices[0].text == " 5, 6, 7"
    assert wait_idle(server.url)["tandem_kv_cache_used_blocks"] == 0


# Load ------------------------------------------------------------------------------------------


def test_200_concurrent_streams_with_disconnects_leak_nothing(server):
    clients = 200
    idle = wait_idle(server.url)
    assert idle["tandem_kv_cache_used_blocks"] == 0

    def run_round(max_tokens, seed):
        results = load_round(server.url, clients, max_tokens, seed)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{errors[:3]}\n{server.log_tail()}"
        done = [r for r in results if r[0] == "done"]
        assert len(done) == clients - clients // 4
        assert all(r[1] in ("stop", "length") and r[2] for r in done), [r for r in done if not r[2]][:5]
        after = wait_idle(server.url, timeout_s=30)
        assert (after["tandem_num_requests_running"], after["tandem_num_requests_waiting"]) == (0, 0), after
        assert after["tandem_kv_cache_used_blocks"] == idle["tandem_kv_cache_used_blocks"], "leaked KV blocks"
        return after

    run_round(max_tokens=3, seed=1)  # warm-up: the allocators reach their working size for a 200-row batch
    rss_warm = server.rss_bytes()

    def ended(reason):
        return metrics(server.url).get(f'tandem_requests_total{{finish_reason="{reason}"}}', 0)

    before = {reason: ended(reason) for reason in ("stop", "length", "client_disconnect")}
    run_round(max_tokens=8, seed=2)
    rss_after = server.rss_bytes()
    print(f"RSS after warm-up {rss_warm / 2**20:.0f} MB, after load {rss_after / 2**20:.0f} MB")
    counted = {reason: ended(reason) - n for reason, n in before.items()}
    # the cut ones were aborted, not finished
    assert counted["stop"] + counted["length"] == clients - clients // 4
    assert counted["client_disconnect"] == clients // 4
    # Weights and the KV cache are allocated at start-up, so growth is allocator noise: glibc arenas and
    # torch's CPU temporaries (one [200, 49152] fp32 logits tensor is 39 MB). 200 MB stays clear of that
    # noise and still catches a real leak: keeping each request's logits, 200 x 8 steps x 197 KB, is 315 MB.
    assert rss_after - rss_warm < 200 * 2**20, f"RSS grew {(rss_after - rss_warm) / 2**20:.0f} MB"


# Sessions --------------------------------------------------------------------------------------

_AGENT_SYSTEM = ("You are a careful planning agent. You answer in one short sentence. " * 12).strip()
_AGENT_TURNS = [
    "List three fruits.",
    "Now list three vegetables.",
    "Which of them is the sweetest?",
    "Summarize our conversation in five words.",
]


def test_multi_turn_agent_session_reuses_its_context(server, client, model_name):
    session = f"agent-{uuid.uuid4().hex}"
    messages = [{"role": "system", "content": f"Session {session}. {_AGENT_SYSTEM}"}]  # nothing cached yet
    previous = None
    for turn, text in enumerate(_AGENT_TURNS):
        messages.append({"role": "user", "content": text})
        kwargs = (
            {"extra_body": {"session_id": session}} if turn % 2 == 0 else {"extra_headers": {"X-Session-Id": session}}
        )
        r = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=16, **kwargs)
        cached = r.usage.prompt_tokens_details.cached_tokens
        print(f"turn {turn}: prompt {r.usage.prompt_tokens}, completion {r.usage.completion_tokens}, cached {cached}")
        if previous is None:
            assert cached == 0
        else:
            context = previous.prompt_tokens + previous.completion_tokens
            assert r.usage.prompt_tokens > context
            # all of the last turn but the partial last block and the re-tokenized end of the last answer
            assert cached >= 0.8 * context and cached >= BLOCK * ((context - BLOCK) // BLOCK) - BLOCK, (
                turn,
                cached,
                context,
            )
        previous = r.usage
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        time.sleep(0.7)  # the agent "thinks": the session keeps its KV meanwhile
    r = post(server, f"/v1/sessions/{session}/end", {})
    assert r.status_code == 200 and r.json() == {"session_id": session, "ended": True}
    r = httpx.delete(server.url + f"/v1/sessions/{session}", timeout=30)
    assert r.status_code == 404 and is_openai_error(r.json())  # ended already
    assert wait_idle(server.url)["tandem_kv_cache_used_blocks"] == 0


# Token ids (issue #14) -------------------------------------------------------------------------
# return_token_ids (vLLM's extension) puts every generated id in the stream, whatever its text: a
# client that sends token ids (experiments/bench_serving.py) builds its next prompt from them. These
# tests serve serve_helpers.write_tiny_model: random weights over Llama-3's 128256 ids, a tokenizer of
# 49152, so most generated tokens decode to "" (ids the tokenizer lacks, parts of characters).


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return write_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny-model"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    with tiny_server(str(tmp_path_factory.mktemp("serve")), tiny_model_dir).running() as s:
        yield s


def _chunk_text(choice: dict) -> str:
    return choice["text"] if "text" in choice else choice["delta"].get("content") or ""


_TINY_REQUESTS = [
    ("/v1/completions", {"prompt": "Hello wörld, 你好"}),
    ("/v1/completions", {"prompt": [5, 6, 7, 60000, 128255]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
]


def test_models_reports_the_vocabulary(tiny):
    # Fails before the fix: /v1/models had no vocab_size (KeyError), so bench_serving took 49152.
    entry = httpx.get(tiny.url + "/v1/models", timeout=30).json()["data"][0]
    assert (entry["vocab_size"], entry["max_model_len"], entry["object"]) == (TINY_VOCAB, 2048, "model")


def test_models_and_metrics_say_the_precision_in_effect(tiny):
    entry = httpx.get(tiny.url + "/v1/models", timeout=30).json()["data"][0]
    assert (entry["dtype"], entry["kv_cache_dtype"], entry["quantization"]) == ("float32", "auto", "none")
    # and the idle prefill chunk the core resolved (None is 0 on the CPU: chunk_size's), which a twin of it needs
    assert entry["idle_chunk_size"] == 0
    metrics = httpx.get(tiny.url + "/metrics", timeout=30).text
    assert re.search(
        r'tandem_model_info\{[^}]*dtype="float32"[^}]*kv_cache_dtype="auto"[^}]*quantization="none"'
        r"[^}]*\} 1\.0",
        metrics,
    ), metrics[:2000]


@pytest.mark.parametrize("path,body", _TINY_REQUESTS)
def test_streamed_token_ids_are_the_whole_output_even_where_the_text_is_empty(tiny, path, body):
    # The stream's ids are the non-streamed request's, each once, however many tokens have no text yet.
    # This guards the reporter's guess for issue #14 (chunks of empty text lose their ids), which was
    # not the bug: before the fix the completions cases passed (they fail if the `meta.token_ids and
    # d.tokens` clause of responses.stream is dropped); the chat case failed only because the stream's
    # first chunk (the role) had no token_ids key.
    body = {**body, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    full = httpx.post(tiny.url + path, json=body, timeout=120).json()
    ids = full["choices"][0]["token_ids"]
    assert len(ids) == full["usage"]["completion_tokens"] == 48
    assert any(t >= TINY_TOKENIZER_SIZE for t in ids)  # ids the tokenizer lacks were generated: text ""
    events = sse_events(tiny.url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    choices = [c for e in events for c in e["choices"]]
    assert all(isinstance(c.get("token_ids"), list) for c in choices), [c for c in choices if "token_ids" not in c]
    streamed = [t for c in choices for t in c["token_ids"]]
    assert streamed == ids and events[-1]["usage"]["completion_tokens"] == len(streamed)
    text = full["choices"][0]["text"] if "text" in full["choices"][0] else full["choices"][0]["message"]["content"]
    assert "".join(_chunk_text(c) for c in choices) == text
    silent = [c for c in choices if c["token_ids"] and not _chunk_text(c)]
    assert len(silent) >= 10, "expected many tokens without text"

    # a stop string: the text ends before it; the ids are those generated up to it (held-back text too)
    at = next(
        i
        for i in range(len(text) // 3, 2 * len(text) // 3)  # mid-text, so tokens come after it
        if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i
    )
    stop = text[at : at + 2]
    stopped = httpx.post(tiny.url + path, json={**body, "stop": [stop]}, timeout=120).json()
    stop_ids = stopped["choices"][0]["token_ids"]
    assert stopped["choices"][0]["finish_reason"] == "stop" and stop_ids == ids[: len(stop_ids)]
    assert len(stop_ids) == stopped["usage"]["completion_tokens"] < len(ids)
    events = sse_events(
        tiny.url, path, {**body, "stop": [stop], "stream": True, "stream_options": {"include_usage": True}}
    )
    choices = [c for e in events for c in e["choices"]]
    assert [t for c in choices for t in c["token_ids"]] == stop_ids
    assert events[-1]["usage"]["completion_tokens"] == len(stop_ids)
    assert "".join(_chunk_text(c) for c in choices) == text[:at]


@pytest.mark.parametrize("path,body", _TINY_REQUESTS[::2])
@pytest.mark.parametrize("flag", [None, False])
def test_without_return_token_ids_no_choice_has_token_ids(tiny, path, body, flag):
    body = {**body, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    if flag is not None:
        body["return_token_ids"] = flag
    full = httpx.post(tiny.url + path, json=body, timeout=120).json()
    assert full["usage"]["completion_tokens"] == 12 and "token_ids" not in full["choices"][0]
    events = sse_events(
        tiny.url,
        path,
        {
            **body,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True if "messages" in body else 0,
        },
    )
    choices = [c for e in events for c in e["choices"]]
    assert choices and not any("token_ids" in c for c in choices)
    assert events[-1]["usage"]["completion_tokens"] == 12


class _ScriptedCore:
    """CoreClient's face for a Choice: replays scripted engine events instead of running a model."""

    def __init__(self, events) -> None:
        self.events, self.aborted, self.stats = events, [], {}

    def add(self, req_id, prompt_ids, params, session_id, namespace, priority):
        import asyncio

        import msgspec

        queue = asyncio.Queue()
        for kind, a, lp, top in self.events:  # a Finished names the request, as the core's do
            queue.put_nowait((kind, msgspec.structs.replace(a, req_id=req_id) if kind == "finished" else a, lp, top))
        return queue

    def abort(self, req_ids):
        self.aborted += req_ids

    def release(self, req_id):
        pass


def _gateway_run(tokenizer, tokens: list[int], finish: str, chat: bool, token_ids: bool, stream: bool, **params):
    """One choice of `tokens` through the gateway's Choice and responses (stream or whole), no model."""
    import asyncio

    from engine.output import OutputProcessor
    from engine.sampling import SamplingParams
    from engine.serve import protocol as P
    from engine.serve import responses as R
    from engine.serve.generation import Choice
    from engine.serve.metrics import Metrics

    events = [("token", t, None, None) for t in tokens] + [
        ("finished", P.Finished(0, finish, None, 3, 0, len(tokens)), None, None)
    ]
    core = _ScriptedCore(events)
    choice = Choice(
        core,
        OutputProcessor(tokenizer),
        0,
        [1, 2, 3],
        SamplingParams(max_tokens=64, **params),
        session_id=None,
        namespace=None,
        priority=0,
        metrics=Metrics(core),
    )
    meta = R.Meta("id", 0, "tiny", chat, tokenizer, token_ids)

    async def run():
        if stream:
            return [json.loads(e[6:]) for e in [x async for x in R.stream(meta, [choice], True)][:-1]]
        async for _ in choice.deltas():
            pass
        return R.full_response(meta, [choice])

    return asyncio.run(run())


@pytest.mark.parametrize("chat", [False, True])
def test_gateway_streams_the_id_of_every_token_whatever_its_text(tiny_model_dir, chat):
    # Deterministic, no model: each kind of token whose text is "" when it arrives, and tokens after a
    # stop string. Fails if a chunk of empty text lost its ids or one was counted twice.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = TINY_BYTE0
    im_end, unknown = 2, TINY_VOCAB - 1  # a special token (skipped), an id the tokenizer lacks
    ni = [b + x for x in "你".encode()]  # three byte tokens: "" "" then "你"
    cases = [  # (tokens, stop strings, the ids that are output, their text)
        ([b + ord("H"), b + ord("i"), im_end, *ni, unknown, b + ord("!")], [], None, "Hi你!"),
        # "!!" stops the output: "a" and the first "!" are held back until it settles, the second "!"
        # completes it (counted, no text); "b" was already in flight: not output, no id, not counted
        ([b + ord("a"), b + ord("!"), unknown, b + ord("!"), b + ord("b")], ["!!"], 4, "a"),
    ]
    for tokens, stop, n_out, text in cases:
        out = tokens[:n_out] if n_out else tokens
        finish = "abort" if stop else "length"
        full = _gateway_run(tok, tokens, finish, chat, True, False, stop=stop or None)
        choice = full["choices"][0]
        assert choice["token_ids"] == out and full["usage"]["completion_tokens"] == len(out)
        assert (choice["message"]["content"] if chat else choice["text"]) == text
        events = _gateway_run(tok, tokens, finish, chat, True, True, stop=stop or None)
        choices = [c for e in events for c in e["choices"]]
        assert all("token_ids" in c for c in choices)
        assert [t for c in choices for t in c["token_ids"]] == out, choices
        assert "".join(_chunk_text(c) for c in choices) == text
        assert events[-1]["usage"]["completion_tokens"] == len(out)
        assert choices[-1]["finish_reason"] == ("stop" if stop else "length")
        assert sum(1 for c in choices if c["token_ids"] and not _chunk_text(c)) >= 3
        plain = _gateway_run(tok, tokens, finish, chat, False, True, stop=stop or None)
        assert not any("token_ids" in c for e in plain for c in e["choices"])
    # shown, the special token has text; skipped (the default) it has none but keeps its id
    full = _gateway_run(tok, [b + ord("H"), im_end], "length", chat, True, False, skip_special_tokens=False)
    assert full["choices"][0]["token_ids"] == [b + ord("H"), im_end]


# API key and engine-core death (the keyed server; death last) ------------------------------------

KEY = "sk-test-123"


def test_api_key_is_required_on_every_route_but_health(keyed_server):
    url = keyed_server.url
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1, "session_id": "s1"}),
        ("POST", "/v1/sessions/s1/end", {}),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1, "session_id": "s1"}),
        ("DELETE", "/v1/sessions/s1", None),
    ]  # each end follows a turn of the session: it knows s1
    for method, path, body in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Bearer {KEY}x"},
        ):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert is_openai_error(r.json()) and r.json()["error"]["type"] == "authentication_error"
        r = httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert r.status_code == 200, (method, path, r.text)
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_bearer_scheme_is_case_insensitive(keyed_server):
    # Fails before the fix: only "Bearer <key>" was let in (RFC 7235: the scheme is case-insensitive).
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
        assert r.status_code == 200, (scheme, r.text)


def test_openai_client_with_the_api_key(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, timeout=120, max_retries=0)
    name = good.models.list().data[0].id
    r = good.completions.create(model=name, prompt=COUNT, temperature=0, max_tokens=3)
    assert r.choices[0].text == " 5,"
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=name, prompt=COUNT, max_tokens=1)


def test_engine_core_death_gives_503_and_a_nonzero_exit(keyed_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = keyed_server.url
    core = keyed_server.core_process()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.post,
            url + "/v1/completions",
            timeout=60,
            headers=auth,
            json={"prompt": COUNT, "max_tokens": 2000, "ignore_eos": True},
        )
        time.sleep(2.0)  # let it reach the core
        core.send_signal(signal.SIGKILL)
        r = in_flight.result(timeout=60)  # the request in flight fails instead of hanging
        assert r.status_code == 503 and is_openai_error(r.json()), r.text
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=auth, timeout=30)
    assert r.status_code == 503 and is_openai_error(r.json()), r.text  # the gateway exits ~1 s after the death
    keyed_server.proc.wait(timeout=15)
    assert keyed_server.proc.returncode not in (0, None), keyed_server.log_tail()
