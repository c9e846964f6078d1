"""Replays a simulator workload against a real OpenAI-compatible endpoint and reports the simulator's metrics.

    python -m experiments.bench_serving --base-url http://127.0.0.1:8000/v1 --workload agentic_coding \\
        --sessions 50 --session-rate 0.2 --pause-scale 0.1 --out outputs/bench_serving
    python -m experiments.bench_serving --workload swe_smith --concurrency 4 --sessions 16 \\
        --params first_turn_tokens=2000 --max-prompt-tokens 8000
    python -m experiments.bench_serving --workload trace --trace tests/data/example_trace.jsonl
    python -m experiments.bench_serving ... --compare outputs/DATE/TIME_lru/summary.json   # beside a simulation

Sessions come from `sim.workloads.make_workload(name, params).sessions(n, seed, rate)` and token
ids from `sim.simulation.TokenFactory(seed, vocab_size)`, exactly as the simulator makes them, so
the same seed sends the same prefixes and new tokens. The vocabulary is `--vocab-size`, else the
`vocab_size` GET /models reports (our server does; vLLM's does not), else 49152 (SmolLM2's):
`vocab_size_source` in the summary says which. Each call is one streamed
`POST /v1/completions` with the prompt as token ids:

    call k prompt = call k-1 prompt + call k-1 output ids + turn k's new ids
    body: prompt, max_tokens = turn output tokens, ignore_eos, stream, stream_options.include_usage,
          session_id, logprobs=0 (one itemised token per chunk), return_token_ids (vLLM's name)

Output ids: when every chunk carries them (vLLM `return_token_ids`: `choices[].token_ids`; or
logprob tokens spelled `token_id:N`, vLLM's `--return-tokens-as-token-ids`) the next prompt
holds the server's own output, as in the simulator (ids outside the vocabulary are refused, but
only when the vocabulary is known: with the 49152 default the server's ids are its own). Otherwise
the same number of synthetic ids is drawn from a per-session stream kept apart from the
new-token stream, so the new tokens still match the simulator's; the server then cannot reuse
its KV of the previous output, so the hit rate can be lower than the simulator's.
`output_ids_from_server` / `output_ids_synthetic` in the summary say which happened.

Drivers: open loop (default) starts session i at its workload start time (the gamma renewal
process at `--session-rate`, or the workload's own rate); closed loop (`--concurrency C`) keeps C
sessions in flight. Between calls a session sleeps `pause_after x --pause-scale`. A session stops
(as a truncated one in the simulator) before a call whose prompt + output exceeds the server's
`max_model_len` (from /v1/models, or `--max-model-len`) or whose prompt exceeds `--max-prompt-tokens`.
A failed call (connection error, HTTP error, error event, no tokens) is counted by kind and
ends its session; `--max-requests` stops issuing calls, `--timeout` cancels everything.

Measured on the client (sim/metrics.py definitions, wall-clock seconds from the run's start):
arrival = request sent; a token's time = when the chunk carrying it is read (a chunk of k tokens
gives k equal times); TTFT = first token - arrival; TPOT = (last token - first) / (outputs - 1);
ITL = gaps between consecutive tokens; per-user tok/s = 1 / TPOT; throughput = tokens / (last
finish - first arrival), per GPU with `--num-gpus`; goodput = requests meeting `--slo-ttft` and
`--slo-tpot`; prefix hit rate = sum usage.prompt_tokens_details.cached_tokens / sum prompt tokens;
prefill amplification = (prompt - cached) / genuinely new tokens; session time = last call's end -
session start. Scheduler-only figures (preemptions, evictions, KV use, steps) are not known here
and are left out. Cached tokens need the server to report them (vLLM:
--enable-prompt-tokens-details; SGLang: --enable-cache-report); without them the cache figures are
blank (NaN / null), not zero. Files in --out: summary.json and requests.csv (the simulator's columns, plus
`output_ids`), and with --plots the simulator's plots.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import math
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sim.metrics import REQUEST_COLUMNS, Collector, Slo
from sim.report import format_table, write_outputs
from sim.simulation import TokenFactory
from sim.workloads import Session, make_workload

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2, the default served model
_SCHEDULER_ONLY = (
    "num_preemptions_recompute",
    "num_preemptions_swap",
    "num_evicted_blocks",
    "num_steps",
    "steps_per_wall_s",
    "simulated_seconds",
)
_CACHED, _PROMPT, _OUTPUTS = (REQUEST_COLUMNS.index(k) for k in ("cached_tokens", "prompt_tokens", "output_tokens"))
assert REQUEST_COLUMNS[_CACHED + 1] == "computed_tokens"
# Synthetic output ids come from their own stream (TokenFactory uses 0x5EED and 0x5E55), so the
# new tokens of every call stay those the simulator sends whatever the server returns.
_SYNTHETIC_OUTPUT_KEY = 0x0A7
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. `concurrency` None: open loop; `session_rate` None: the workload's rate."""

    base_url: str = "http://127.0.0.1:8000/v1"
    workload: str = "agentic_coding"
    params: dict = field(default_factory=dict)
    sessions: int = 20
    session_rate: float | None = None
    concurrency: int | None = None
    seed: int = 0
    model: str | None = None
    vocab_size: int | None = None
    max_model_len: int | None = None
    max_prompt_tokens: int | None = None
    pause_scale: float = 1.0
    slo_ttft_s: float = 5.0
    slo_tpot_s: float = 1.0 / 70.0
    num_gpus: int = 1
    max_requests: int | None = None
    timeout_s: float | None = 3600.0
    request_timeout_s: float = 600.0
    api_key: str | None = None
    logprobs: bool = True
    return_token_ids: bool = True
    send_session_id: bool = True
    end_sessions: bool = False
    extra_body: dict = field(default_factory=dict)
    label: str = "endpoint"

    def __post_init__(self) -> None:
        for name in ("sessions", "num_gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in (
            "session_rate",
            "concurrency",
            "max_requests",
            "timeout_s",
            "max_prompt_tokens",
            "vocab_size",
            "max_model_len",
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or unset)")
        if not (self.pause_scale >= 0 and self.slo_ttft_s > 0 and self.slo_tpot_s > 0):
            raise ValueError("pause_scale must be >= 0 and the SLOs > 0")


# --------------------------------------------------------------------------- one streamed call


class CallFailed(Exception):
    """A call that produced no usable output; `kind` is the error counter's key."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class StreamedCall:
    """What one call measured; the attribute names are those `sim.metrics.Collector.on_request` reads."""

    request_id: int
    arrival_time: float
    token_times: np.ndarray
    output_token_ids: list[int] | None  # None: the server did not give them all
    num_prompt_tokens: int
    num_cached_tokens: float  # NaN: the server did not report it
    finish_time: float
    first_scheduled_time: float = math.nan  # not visible from the client
    num_preemptions: float = math.nan

    @property
    def num_computed_tokens(self) -> float:
        """Prefilled (prompt - cached) plus decoded (outputs - 1), as the simulator counts them."""
        return self.num_prompt_tokens - self.num_cached_tokens + self.token_times.size - 1


def chunk_tokens(choice: dict) -> tuple[int, list[int] | None]:
    """(tokens in one streamed choice, their ids or None): token_ids, else logprob tokens, else 1 per text."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids), [int(t) for t in ids]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        tokens = logprobs["tokens"]
        matches = [_TOKEN_ID.match(t) if isinstance(t, str) else None for t in tokens]
        return len(tokens), [int(m.group(1)) for m in matches] if all(matches) else None
    return (1 if choice.get("text") else 0), None


async def stream_call(client: httpx.AsyncClient, url: str, body: dict, clock, request_id: int) -> StreamedCall:
    """Sends one streamed completion and times every token as its chunk arrives.

    Raises:
        CallFailed: HTTP status other than 200, an error event, malformed data or no tokens.
        httpx.HTTPError: connection and timeout errors (the caller counts them).
    """
    arrival = clock()
    times: list[float] = []
    ids: list[int] | None = []
    usage: dict = {}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:300].decode("utf-8", "replace")
            raise CallFailed(f"http_{response.status_code}", detail)
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = clock()
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise CallFailed("bad_json", data[:120]) from None
            if "error" in chunk:
                raise CallFailed("stream_error", str(chunk["error"])[:300])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                n, chunk_ids = chunk_tokens(choice)
                times.extend([now] * n)
                if ids is not None and chunk_ids is not None:
                    ids.extend(chunk_ids)
                elif n:
                    ids = None
    end = clock()
    reported = int(usage.get("completion_tokens") or 0)
    if reported > len(times):  # tokens the stream did not itemise: placed at the last chunk
        times.extend([times[-1] if times else end] * (reported - len(times)))
        ids = None
    if not times:
        raise CallFailed("no_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return StreamedCall(
        request_id,
        arrival,
        np.asarray(times),
        ids if ids and len(ids) == len(times) else None,
        len(body["prompt"]),
        float(cached) if cached is not None else math.nan,
        end,
    )


# --------------------------------------------------------------------------- the replay


@dataclass
class ServerInfo:
    model: str | None
    max_model_len: int | None
    vocab_size: int
    error: str | None = None  # why GET /models gave nothing (the defaults are used)
    vocab_source: str = "default"  # where vocab_size came from: "options", "server" or "default"

    def accepts(self, output_ids) -> bool:
        """Whether the server's output ids can go into the next prompt: ids in the vocabulary, any
        id >= 0 when the vocabulary is only the default (the server's own ids are valid for it)."""
        if min(output_ids) < 0:
            return False
        return self.vocab_source == "default" or max(output_ids) < self.vocab_size


async def server_info(client: httpx.AsyncClient, options: BenchOptions) -> ServerInfo:
    """Model name, context length and vocabulary from the options, else GET /models, else defaults."""
    entry: dict = {}
    error = None
    try:
        response = await client.get(f"{options.base_url}/models")
        response.raise_for_status()
        entry = (response.json().get("data") or [{}])[0]
    except (httpx.HTTPError, ValueError, AttributeError, IndexError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    max_len = options.max_model_len or entry.get("max_model_len")
    if options.vocab_size:
        vocab, source = options.vocab_size, "options"
    elif entry.get("vocab_size"):
        vocab, source = entry["vocab_size"], "server"
    else:
        vocab, source = DEFAULT_VOCAB_SIZE, "default"
    return ServerInfo(options.model or entry.get("id"), int(max_len) if max_len else None, int(vocab), error, source)


class Replay:
    """Runs sessions against the endpoint, reporting each call and session to a sim Collector."""

    def __init__(self, options: BenchOptions, client: httpx.AsyncClient, info: ServerInfo, errors: Counter) -> None:
        self.options, self.client, self.info, self.errors = options, client, info, errors
        self.tokens = TokenFactory(options.seed, info.vocab_size)
        self.collector = Collector(options.num_gpus, 1, math.inf, Slo(options.slo_ttft_s, options.slo_tpot_s))
        self.sources: list[str] = []  # per collected request: "server" or "synthetic"
        self.seen_prefixes: set[tuple[int, int]] = set()
        self.ids = itertools.count()
        self.sent = 0
        self.cut_sessions = 0  # stopped by --max-requests or a failed call
        self.truncated_sessions = 0  # stopped before a call over max_model_len / --max-prompt-tokens
        self.unsent_sessions = 0  # ... of them, stopped before their first call
        self.unsent_turns = 0  # turns those sessions did not send
        self.short_outputs = 0  # calls that returned fewer or more tokens than max_tokens
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def body(self, prompt: np.ndarray, max_tokens: int, session_id: str) -> dict:
        o = self.options
        body: dict[str, Any] = {
            "prompt": prompt.tolist(),
            "max_tokens": int(max_tokens),
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.info.model:
            body["model"] = self.info.model
        if o.send_session_id:
            body["session_id"] = session_id
        if o.logprobs:
            body["logprobs"] = 0
        if o.return_token_ids:
            body["return_token_ids"] = True
        body.update(o.extra_body)
        return body

    def fits(self, prompt_len: int, output_tokens: int) -> int:
        """Tokens this call may generate; 0 when the session must stop here (the simulator's truncation)."""
        if self.options.max_prompt_tokens is not None and prompt_len > self.options.max_prompt_tokens:
            return 0
        limit = self.info.max_model_len
        return max(0, min(output_tokens, limit - prompt_len)) if limit else output_tokens

    async def call(self, prompt: np.ndarray, max_new: int, session_id: str) -> StreamedCall | None:
        """One call; failures are counted by kind and give None."""
        url = f"{self.options.base_url}/completions"
        try:
            return await stream_call(
                self.client, url, self.body(prompt, max_new, session_id), self.clock, next(self.ids)
            )
        except CallFailed as exc:
            self.errors[exc.kind] += 1
        except httpx.TimeoutException:
            self.errors["timeout"] += 1
        except httpx.TransportError as exc:  # connect refused, reset, protocol errors
            self.errors[type(exc).__name__] += 1
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a body of an unexpected shape
            self.errors[f"bad_response_{type(exc).__name__}"] += 1
        return None

    async def run_session(self, index: int, session: Session, wait_for_start: bool) -> None:
        """One session, as sim/simulation.py's run_session builds its prompts."""
        news = self.tokens.session_new_tokens(self.tokens.session_rng(index), session.turns)
        context = self.tokens.prefix(session.prefix_id, session.prefix_tokens)
        sends_nothing = self.fits(context.size + news[0].size, session.turns[0].output_tokens) < 1
        if wait_for_start and not sends_nothing and session.start_time > self.clock():
            await asyncio.sleep(session.start_time - self.clock())
        start = self.clock()
        outputs_rng = np.random.default_rng([self.options.seed, _SYNTHETIC_OUTPUT_KEY, index])
        truncated, calls = False, 0
        for k, (turn, new) in enumerate(zip(session.turns, news)):
            prompt = np.concatenate([context, new]) if context.size else new
            max_new = self.fits(prompt.size, turn.output_tokens)
            if max_new < 1:
                truncated = True
                self.truncated_sessions += 1
                self.unsent_sessions += k == 0
                self.unsent_turns += len(session.turns) - k
                break
            if self.options.max_requests is not None and self.sent >= self.options.max_requests:
                self.cut_sessions += 1
                return
            genuinely_new = new.size
            key = (session.prefix_id, session.prefix_tokens)
            if k == 0 and session.prefix_id >= 0 and key not in self.seen_prefixes:
                self.seen_prefixes.add(key)
                genuinely_new += session.prefix_tokens
            self.sent += 1
            done = await self.call(prompt, max_new, session.session_id)
            if done is None:
                self.cut_sessions += 1
                return
            calls += 1
            self.short_outputs += done.token_times.size != max_new
            self.collector.on_request(done, session.session_id, k, 0, new.size, genuinely_new)
            output = done.output_token_ids
            if output is not None and self.info.accepts(output):
                self.sources.append("server")
            else:
                self.sources.append("synthetic")
                output = outputs_rng.integers(0, self.info.vocab_size, size=done.token_times.size)
            context = np.concatenate([prompt, np.asarray(output, dtype=np.int32)])
            if turn.pause_after > 0 and k + 1 < len(session.turns):
                await asyncio.sleep(turn.pause_after * self.options.pause_scale)
        if self.options.end_sessions:
            await self.end_session(session.session_id)
        self.collector.on_session(session.session_id, start, self.clock(), calls, truncated)

    async def end_session(self, session_id: str) -> None:
        try:
            await self.client.post(f"{self.options.base_url}/sessions/{session_id}/end")
        except httpx.HTTPError:
            self.errors["end_session"] += 1


async def _drive(replay: Replay, workload, options: BenchOptions) -> None:
    if options.concurrency is None:
        sessions = workload.sessions(options.sessions, options.seed, options.session_rate)
        await asyncio.gather(*(replay.run_session(i, s, wait_for_start=True) for i, s in enumerate(sessions)))
        return
    source = enumerate(itertools.islice(workload.iter_sessions(options.seed, options.session_rate), options.sessions))

    async def worker():
        for index, session in source:
            if options.max_requests is not None and replay.sent >= options.max_requests:
                return
            await replay.run_session(index, session, wait_for_start=False)

    await asyncio.gather(*(worker() for _ in range(options.concurrency)))


# --------------------------------------------------------------------------- results


@dataclass
class BenchResult:
    """Duck-types sim.simulation.SimResult for sim.report.write_outputs and plot_run."""

    summary: dict
    collector: Collector
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    kv_blocks_per_replica: int = 1

    @property
    def requests(self):
        table = self.collector.request_table()
        table["output_ids"] = self.sources
        return table


async def run_benchmark(options: BenchOptions) -> BenchResult:
    """Replays the workload against `options.base_url`; connection and HTTP errors are counted, not raised."""
    workload = make_workload(options.workload, options.params)  # bad parameters fail before any request
    errors: Counter = Counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
    timeout = httpx.Timeout(options.request_timeout_s, connect=min(10.0, options.request_timeout_s))
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        info = await server_info(client, options)
        replay = Replay(options, client, info, errors)
        wall = time.perf_counter()
        timed_out = False
        try:
            await asyncio.wait_for(_drive(replay, workload, options), options.timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
        wall = time.perf_counter() - wall
    return BenchResult(summarize(replay, options, info, errors, wall, timed_out), replay.collector, replay.sources)


def summarize(
    replay: Replay, options: BenchOptions, info: ServerInfo, errors: Counter, wall: float, timed_out: bool
) -> dict:
    """The simulator's summary of what was measured, plus whole-endpoint throughput and the run's facts."""
    c = replay.collector
    num_errors = int(sum(v for k, v in errors.items() if k != "end_session"))
    cached_known = all(math.isfinite(row[_CACHED]) for row in c.requests)
    out = _collector_summary(c, wall)
    for key in _SCHEDULER_ONLY:
        out.pop(key, None)
    if c.requests:
        arrival, finish = REQUEST_COLUMNS.index("arrival"), REQUEST_COLUMNS.index("finish")
        span = max(r[finish] for r in c.requests) - min(r[arrival] for r in c.requests)
        out["span_seconds"] = float(span)
        for kind in ("output", "total"):
            out[f"{kind}_tok_s"] = out[f"per_gpu_{kind}_tok_s"] * options.num_gpus
            out[f"{kind}_tok_min"] = 60 * out[f"{kind}_tok_s"]
        if not cached_known:
            out.update(prefix_hit_rate=math.nan, prefill_amplification=math.nan, prefilled_tokens=None)
    out.update(
        {
            "policy": options.label,
            "model": info.model,
            "hardware": options.label,
            "workload": options.workload,
            "base_url": options.base_url,
            "mode": "open" if options.concurrency is None else "closed",
            "concurrency": options.concurrency,
            "session_rate": options.session_rate,
            "seed": options.seed,
            "pause_scale": options.pause_scale,
            "vocab_size": info.vocab_size,
            "vocab_size_source": info.vocab_source,
            "max_model_len": info.max_model_len,
            "models_error": info.error,
            "slo_ttft_s": options.slo_ttft_s,
            "slo_tpot_s": options.slo_tpot_s,
            "num_gpus": options.num_gpus,
            "requests_sent": replay.sent,
            "num_errors": num_errors,
            "cancelled_requests": replay.sent - len(c.requests) - num_errors,
            "errors": dict(errors),
            "cut_sessions": replay.cut_sessions,
            "short_outputs": replay.short_outputs,
            "truncated_sessions": replay.truncated_sessions,
            "unsent_sessions": replay.unsent_sessions,
            "unsent_turns": replay.unsent_turns,
            "max_prompt_tokens": options.max_prompt_tokens,
            "timed_out": timed_out,
            "output_ids_from_server": replay.sources.count("server"),
            "output_ids_synthetic": replay.sources.count("synthetic"),
            "completed": not timed_out and len(c.sessions) == options.sessions and not replay.cut_sessions,
            "wall_seconds": wall,
        }
    )
    return out


def _collector_summary(c: Collector, wall: float) -> dict:
    """Collector.summary; rows whose cached count is unknown (NaN) count as 0 cached there, so the sums
    stay finite (the cache figures are then blanked by the caller), without touching `c`."""
    if all(math.isfinite(row[_CACHED]) for row in c.requests):
        return c.summary([], wall)
    filled = copy.copy(c)
    filled.requests = [
        row
        if math.isfinite(row[_CACHED])
        else row[:_CACHED] + (0.0, row[_PROMPT] + row[_OUTPUTS] - 1) + row[_CACHED + 2 :]
        for row in c.requests
    ]
    return filled.summary([], wall)


DETAIL_ROWS = (
    ("TTFT s", "ttft_s", 1),
    ("TPOT ms", "tpot_s", 1e3),
    ("ITL ms", "itl_s", 1e3),
    ("E2E s", "e2e_s", 1),
    ("user tok/s", "per_user_tok_s", 1),
    ("session s", "session_s", 1),
)


def format_details(summary: dict) -> str:
    """Latency percentiles, throughput, goodput and cache figures of one run, as plain text."""

    def fmt(value, scale=1.0):
        return "-" if value is None or not math.isfinite(value) else f"{value * scale:.3f}"

    lines = [f"{'':12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for label, key, scale in DETAIL_ROWS:
        lines.append(
            f"{label:12}"
            + "".join(f"{fmt(summary.get(f'{key}_{q}'), scale):>10}" for q in ("mean", "p50", "p90", "p99"))
        )
    g = summary.get
    lines += [
        f"requests {g('num_requests')}  sessions {g('num_sessions')}  errors {g('num_errors')} {g('errors')}  "
        f"span {fmt(g('span_seconds'))} s",
        f"output tok/s {fmt(g('output_tok_s'))}  total tok/s {fmt(g('total_tok_s'))}  "
        f"output tok/min {fmt(g('output_tok_min'))}  total tok/min {fmt(g('total_tok_min'))}",
        f"SLO (TTFT <= {g('slo_ttft_s')} s, TPOT <= {fmt(g('slo_tpot_s'), 1e3)} ms) met {fmt(g('slo_attainment'))}, "
        f"goodput {fmt(g('goodput_req_s_per_gpu'))} req/s per GPU",
        f"prefix hit rate {fmt(g('prefix_hit_rate'))}  prefill amplification {fmt(g('prefill_amplification'))}  "
        f"output ids: {g('output_ids_from_server')} from the server, {g('output_ids_synthetic')} synthetic  "
        f"vocabulary {g('vocab_size')} ({g('vocab_size_source')})",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--params wants key=value, got {item!r}")
        out[key] = _value(value)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[BenchOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--workload", default="agentic_coding")
    p.add_argument("--trace", help="JSONL trace file (sets --workload trace)")
    p.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE", help="workload parameters")
    p.add_argument("--sessions", type=int, default=20)
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--session-rate", type=float, help="open loop: sessions/s (default: the workload's)")
    loop.add_argument("--concurrency", type=int, help="closed loop: sessions in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--pause-scale", type=float, default=1.0)
    p.add_argument("--slo-ttft", type=float, default=5.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=1.0 / 70.0, help="seconds per output token")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs behind the endpoint (per-GPU figures)")
    p.add_argument("--max-requests", type=int)
    p.add_argument("--timeout", type=float, default=3600.0, help="whole run, seconds")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds of silence before a call fails")
    p.add_argument("--api-key")
    p.add_argument("--no-logprobs", action="store_true")
    p.add_argument("--no-return-token-ids", action="store_true")
    p.add_argument("--no-session-id", action="store_true")
    p.add_argument("--end-sessions", action="store_true", help="POST /sessions/{id}/end after a session (ours)")
    p.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    p.add_argument("--label", default="endpoint", help="the run's name in the table")
    p.add_argument("--out", help="directory for summary.json and requests.csv")
    p.add_argument("--plots", action="store_true")
    p.add_argument("--compare", nargs="*", default=[], help="summary.json files to print beside this run")
    a = p.parse_args(argv)
    params = _pairs(a.params)
    workload = a.workload
    if a.trace:
        workload, params["path"] = "trace", a.trace
    options = BenchOptions(
        base_url=a.base_url.rstrip("/"),
        workload=workload,
        params=params,
        sessions=a.sessions,
        session_rate=a.session_rate,
        concurrency=a.concurrency,
        seed=a.seed,
        model=a.model,
        vocab_size=a.vocab_size,
        max_model_len=a.max_model_len,
        max_prompt_tokens=a.max_prompt_tokens,
        pause_scale=a.pause_scale,
        slo_ttft_s=a.slo_ttft,
        slo_tpot_s=a.slo_tpot,
        num_gpus=a.num_gpus,
        max_requests=a.max_requests,
        timeout_s=a.timeout,
        request_timeout_s=a.request_timeout,
        api_key=a.api_key,
        logprobs=not a.no_logprobs,
        return_token_ids=not a.no_return_token_ids,
        send_session_id=not a.no_session_id,
        end_sessions=a.end_sessions,
        extra_body=json.loads(a.extra_body),
        label=a.label,
    )
    return options, a


def truncation_warning(summary: dict) -> str | None:
    """What the context limits cut, in words (the simulator's truncation, easy to miss in a table)."""
    n = summary.get("truncated_sessions") or 0
    if not n:
        return None
    limits = [f"max_model_len {summary['max_model_len']}"] if summary.get("max_model_len") else []
    if summary.get("max_prompt_tokens"):
        limits.append(f"--max-prompt-tokens {summary['max_prompt_tokens']}")
    return (
        f"warning: {n} of {summary['num_sessions']} sessions were cut short by {' and '.join(limits)}: "
        f"{summary['unsent_sessions']} sent nothing (their first call did not fit) and "
        f"{summary['unsent_turns']} turns were not sent. Make the workload fit: --params "
        f"context_max={summary.get('max_model_len') or 'N'} (for agentic_coding also prefix_tokens_min, "
        "prefix_tokens_max, new_tokens_max and output_max that fit in it)."
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints its table.

    Raises:
        SystemExit: (non-zero) when no call completed, e.g. every session cut by max_model_len.
    """
    options, args = parse_args(argv)
    result = asyncio.run(run_benchmark(options))
    summaries = [result.summary] + [json.loads(Path(path).read_text()) for path in args.compare]
    print(format_table(summaries))
    print()
    print(format_details(result.summary))
    if args.out:
        with warnings.catch_warnings():  # kv_usage.png has no KV samples to plot here
            warnings.simplefilter("ignore", UserWarning)
            paths = write_outputs(result, args.out, plots=args.plots and result.summary["num_requests"] > 0)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    warning = truncation_warning(result.summary)
    if warning:
        print(warning, file=sys.stderr)
    if not result.summary["num_requests"]:
        s = result.summary
        raise SystemExit(
            f"bench_serving: no call completed ({s['requests_sent']} sent, {s['num_errors']} failed "
            f"{s['errors']}, {s['unsent_sessions']} of {options.sessions} sessions sent nothing)"
        )
    return result.summary


if __name__ == "__main__":
    main()
