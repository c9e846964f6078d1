"""A new user's day with the server (issue #19): disconnects, a killed gateway, parameters the server
cannot honour, the OpenAPI schema held to the server (schemathesis), metrics and the startup log.

One `python -m engine.serve` on the embedded SmolLM2-135M (CPU) with a 64-token model length, so the
longest generation is short; the last test SIGKILLs its gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("psutil")

import httpx
import psutil

from serve_helpers import ServerProcess, is_openai_error, metrics, wait_idle

MAX_MODEL_LEN = 64
COUNT = "1, 2, 3, 4,"
USER = [{"role": "user", "content": "hi"}]
# 8 choices of 30 tokens: seconds of decoding on CPU, so only an abort can free them within the deadline
LONG = {"prompt": COUNT, "n": 8, "max_tokens": 30, "ignore_eos": True, "temperature": 1.0}
FREED_WITHIN_S = 2.0  # the gateway notices within 0.5 s, the core reports its counters every 0.5 s

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    small = ServerProcess(
        str(tmp_path_factory.mktemp("serve")), name="small", overrides=(f"scheduler.max_model_len={MAX_MODEL_LEN}",)
    )
    with small.running() as s:
        print(f"server log: {s.log_path}")
        yield s


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=kwargs.pop("timeout", 120), **kwargs)


def _requests_by_reason(url: str) -> dict[str, float]:
    m = metrics(url)
    found = (re.fullmatch(r'tandem_requests_total\{finish_reason="(\w+)"\}', k) for k in m)
    return {f.group(1): m[f.group(0)] for f in found if f}


def _seconds_until_freed(url: str, since: float) -> float:
    """Polls /metrics until no request runs or waits and no KV block is held; fails past the deadline."""
    while True:
        m = metrics(url)
        if (m["tandem_num_requests_running"], m["tandem_num_requests_waiting"], m["tandem_kv_cache_used_blocks"]) == (
            0,
            0,
            0,
        ):
            return time.monotonic() - since
        assert time.monotonic() - since < FREED_WITHIN_S, f"still busy {FREED_WITHIN_S} s after the disconnect: {m}"
        time.sleep(0.1)


# 1. A client that goes away aborts its request -------------------------------------------------


def test_non_streaming_client_disconnect_frees_the_request_within_a_second(server):
    # Fails before the fix: under BaseHTTPMiddleware request.is_disconnected() never turned true, so
    # the 8 choices ran their 30 tokens to the end (~4 s) after the client had gone.
    wait_idle(server.url)
    before = metrics(server.url)
    reasons = _requests_by_reason(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0))
    gone = time.monotonic()
    print(f"freed {_seconds_until_freed(server.url, gone):.2f} s after the disconnect")
    generated = metrics(server.url)["tandem_generation_tokens_total"] - before["tandem_generation_tokens_total"]
    assert generated < LONG["n"] * LONG["max_tokens"] / 2  # stopped early, not run to the end
    after = _requests_by_reason(server.url)
    assert after.get("client_disconnect", 0) - reasons.get("client_disconnect", 0) == LONG["n"]


@pytest.mark.parametrize(
    "path,body", [("/v1/completions", LONG), ("/v1/chat/completions", {**LONG, "prompt": None, "messages": USER})]
)
def test_streaming_client_disconnect_frees_the_request_within_a_second(server, path, body):
    body = {k: v for k, v in body.items() if v is not None}
    wait_idle(server.url)
    before = metrics(server.url)
    reasons = _requests_by_reason(server.url)
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith("data: ") else []
            if any(c.get("text") or c.get("delta", {}).get("content") for c in choices):
                break  # a token came: the request is decoding
    gone = time.monotonic()
    print(f"freed {_seconds_until_freed(server.url, gone):.2f} s after the disconnect")
    generated = metrics(server.url)["tandem_generation_tokens_total"] - before["tandem_generation_tokens_total"]
    assert generated < body["n"] * body["max_tokens"] / 2
    after = _requests_by_reason(server.url)
    assert after.get("client_disconnect", 0) - reasons.get("client_disconnect", 0) == body["n"]


# 3. Parameters the server cannot honour are refused, never ignored -------------------------------

REFUSED = [  # (path, body, the parameter the 400 names)
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"28": 100}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"28": 100}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ]
        },
        "messages.0.content.1.type",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            ]
        },
        "messages.1.tool_calls",
    ),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"messages": USER, "min_tokens": 5, "max_completion_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": [True, 2, 3]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [False]]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [True]}, "stop_token_ids"),
]


@pytest.mark.parametrize(
    "path,body,param", REFUSED, ids=[f"{p[4:]}-{param}-{i}" for i, (p, _, param) in enumerate(REFUSED)]
)
def test_parameters_the_server_cannot_honour_get_400(server, path, body, param):
    # Fails before the fix: each was accepted (200) and ignored, or (booleans) read as token id 1 / 0.
    r = post(server, path, {"max_tokens": 2, **body})
    assert r.status_code == 400 and is_openai_error(r.json()), r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "hi", "echo": False, "suffix": None, "best_of": 1, "logit_bias": {}}),
        ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 2}),
        (
            "/v1/chat/completions",
            {
                "messages": USER,
                "response_format": {"type": "text"},
                "tool_choice": "none",
                "tools": [],
                "logit_bias": None,
                "top_logprobs": 0,
                "logprobs": True,
            },
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {"role": "assistant", "content": ""},
                    *USER,
                ]
            },
        ),
    ],
)
def test_what_changes_nothing_is_still_accepted(server, path, body):
    r = post(server, path, {"max_tokens": 2, **body})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path", [("POST", "/v1/sessions/{}/end"), ("DELETE", "/v1/sessions/{}")])
def test_ending_a_session_the_server_does_not_know_is_404(server, method, path):
    # Fails before the fix: any id answered {"ended": true}.
    r = httpx.request(method, server.url + path.format("never-seen"), timeout=30)
    assert r.status_code == 404 and is_openai_error(r.json()), r.text
    assert "never-seen" in r.json()["error"]["message"]
    session = f"s-{method}"
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "session_id": session}).status_code == 200
    r = httpx.request(method, server.url + path.format(session), timeout=30)
    assert r.status_code == 200 and r.json() == {"session_id": session, "ended": True}
    assert httpx.request(method, server.url + path.format(session), timeout=30).status_code == 404  # ended


# 4. The OpenAPI schema says what the server does -----------------------------------------------


def test_openapi_documents_400_errors_text_metrics_and_the_enforced_ranges(server):
    # Fails before the fix: 422 (never sent) documented instead of 400, /metrics as JSON, no ranges.
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            assert "422" not in op["responses"], (method, path)
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    error = completions["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    body = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert (body["n"]["minimum"], body["n"]["maximum"]) == (1, 16)
    assert body["logprobs"]["anyOf"][0]["maximum"] == 20
    assert body["max_tokens"]["anyOf"][0]["minimum"] == 1
    assert body["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1  # the served model's
    chat = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat["top_p"]["anyOf"][0]["exclusiveMinimum"] == 0 and chat["top_p"]["anyOf"][0]["maximum"] == 1
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20


def test_405_says_which_methods_are_allowed(server):
    # Fails before the fix: the error handler dropped Starlette's Allow header.
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and is_openai_error(r.json())


CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,unsupported_method,allow_header_conformance"
)


def test_schemathesis_finds_the_server_true_to_its_schema_and_leaking_nothing(server, tmp_path):
    pytest.importorskip("schemathesis")
    report = tmp_path / "junit.xml"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"),
        "run",
        server.url + "/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "25",
        "--max-time",
        "45",
        "--seed",
        "19",
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--no-shrink",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False
    )  # its .schemathesis/ there
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    m = wait_idle(server.url, timeout_s=10)
    assert (m["tandem_num_requests_running"], m["tandem_num_requests_waiting"], m["tandem_kv_cache_used_blocks"]) == (
        0,
        0,
        0,
    ), m


# 5. Observability -------------------------------------------------------------------------------


def test_metrics_have_total_kv_blocks_and_queue_time(server):
    # Fails before the fix: neither metric existed.
    post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    m = metrics(server.url)
    assert m["tandem_kv_cache_total_blocks"] == 1024  # serve_helpers.NUM_BLOCKS
    assert m["tandem_request_queue_time_seconds_count"] >= 1


def test_startup_log_names_device_dtype_model_and_kv_cache(server):
    # Fails before the fix: the log said only "serving <model> on <url>".
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        head = f.read(20_000)
    line = re.search(
        r"engine core ready: (\S+) on (\S+), (\S+) \(KV cache (\S+), weights (\S+)\), "
        r"1024 KV blocks of 16 tokens \(([\d.]+) GiB\)",
        head,
    )
    assert line, head
    model, device, dtype, kv_dtype, weights, gib = line.groups()
    assert model.startswith("SmolLM2-135M") and (device, dtype, kv_dtype, weights) == ("cpu", "float32", "auto", "none")
    # SmolLM2-135M: 30 layers x (K + V) x 3 KV heads x 64 dims x 4 bytes = 46080 bytes a token
    assert float(gib) == pytest.approx(1024 * 16 * 46080 / 2**30, abs=0.01)


# 2. A killed gateway takes its engine core with it (last: it kills the server) -------------------


def test_sigkilled_gateway_takes_the_core_with_it(server):
    # Fails before the fix: the core ran on, re-parented to init, holding its memory (and GPU) forever.
    core = server.core_process()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    _, alive = psutil.wait_procs([core], timeout=5)
    for p in alive:  # ServerProcess.stop cannot find it once its gateway is gone
        p.kill()
    assert not alive, f"the engine core {core.pid} outlived its gateway"
