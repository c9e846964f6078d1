"""The output processor of `LLM` and the server: what the engine produced, turned into each request's output.

    StepOutput (EngineCore.step; over IPC, the server's Tokens and Finished) --OutputProcessor-->
        a Delta per event, and the request's RequestState (text, tokens, logprobs, finish reason, counts)

Byte-level BPE tokens can end inside a multi-byte character: text is released only once it decodes
cleanly, from a short window of ids (as vLLM does). Text that could still begin a stop string is held
back until the next token settles it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import numpy as np

if TYPE_CHECKING:
    from engine.sampling import SamplingParams


class Finished(msgspec.Struct, tag=True, array_like=True):
    """A request the engine ended, in OpenAI's terms, and its counts (also the server's IPC record)."""

    req_id: int
    reason: str  # stop | length | abort
    stop_token: int | None  # the stop token that ended it (reason "stop")
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    queue_time: float | None = None  # arrival -> first scheduled (None when aborted)


@dataclass
class StepOutput:
    """What one engine step produced: a token per request that sampled (plan order) with, when any of
    them asked for logprobs, every row's logprob (and top ones); and the requests that finished."""

    req_ids: np.ndarray
    tokens: np.ndarray
    finished: list[Finished] = field(default_factory=list)
    seconds: float = 0.0
    logprobs: np.ndarray | None = None  # [S] of the sampled tokens
    top_ids: np.ndarray | None = None  # [S, N]: N the most any row asked for
    top_logprobs: np.ndarray | None = None  # [S, N]


@dataclass
class Delta:
    """What one request's output gained from one event (each output token's id once, whatever its text)."""

    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(eq=False)
class RequestState:
    """One request's output so far: the processor's record of it, which `LLM` and the server read."""

    req_id: int
    params: SamplingParams
    num_prompt_tokens: int
    stop: StopMatcher
    detok: IncrementalDetokenizer | None
    tokens: list[int] = field(default_factory=list)  # output: up to the token that ended a stop string
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""  # the whole text, once finished
    finish_reason: str | None = None  # "stop" | "length", once finished
    stop_reason: int | str | None = None  # the stop token or stop string that ended it
    num_cached_tokens: int = 0


class OutputProcessor:
    """Detokenizes, applies stop strings, keeps the logprobs each request asked for and decides its finish
    reason, for the requests of an `LLM` run or of a gateway.

    Args:
        tokenizer: decodes token ids; None: every text is "".
        stream: detokenize as tokens come, for Deltas of text (the server); False (`LLM`): a request's
            text is decoded once, at its end, unless it has stop strings to watch for.
    """

    def __init__(self, tokenizer, stream: bool = True) -> None:
        self.tokenizer, self.stream = tokenizer, stream
        self.requests: dict[int, RequestState] = {}  # added, not finished or released yet

    def add(self, req_id: int, params: SamplingParams, num_prompt_tokens: int) -> RequestState:
        """Starts a request's record; the processor keeps it until `finish` or `release`."""
        watch = self.tokenizer is not None and (self.stream or bool(params.stop_list))
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if watch else None
        state = RequestState(
            req_id, params, num_prompt_tokens, StopMatcher(params.stop_list, params.include_stop_str_in_output), detok
        )
        self.requests[req_id] = state
        return state

    def release(self, req_id: int) -> None:
        """Forgets a request that will not finish here (its client went away, its core died)."""
        self.requests.pop(req_id, None)

    def on_token(
        self, req_id: int, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None
    ) -> Delta | None:
        """One sampled token; None if it is not output (a request not here, or a token in flight past the
        stop string that ended it). `logprob`, `top`: the step's, computed for every row when any row asks."""
        r = self.requests.get(req_id)
        if r is None or r.stop.stopped is not None:
            return None
        r.tokens.append(token)  # output, and in its Delta, even when its text is "" (for now, or for good)
        delta = Delta(r.stop.push(r.detok.add(token)) if r.detok is not None else "", [token])
        wanted = r.params.logprobs
        if wanted is not None and logprob is not None:
            r.logprobs.append(logprob)
            delta.logprobs = [logprob]
            if top is not None:
                r.top.append(top[:wanted])
                delta.top = [r.top[-1]]
        return delta

    def finish(self, f: Finished) -> Delta | None:
        """The engine ended a request (a limit, a stop token, or the abort after its stop string): its last
        Delta, with the text held back for stop strings and the finish reason; None if it is not here."""
        r = self.requests.pop(f.req_id, None)
        if r is None:
            return None
        r.num_cached_tokens, stopped = f.num_cached_tokens, r.stop.stopped
        tail = r.stop.flush() if stopped is None else ""
        # a stop string wins over the engine's reason (the abort after it, or a limit on the same token)
        r.finish_reason = "length" if stopped is None and f.reason == "length" else "stop"
        r.stop_reason = f.stop_token if stopped is None else stopped
        if self.stream or stopped is not None:
            r.text = r.stop.text
        elif self.tokenizer is not None:
            r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=r.params.skip_special_tokens)
        return Delta(tail, finish_reason=r.finish_reason)

    def process(self, out: StepOutput) -> tuple[list[RequestState], list[RequestState]]:
        """Applies one engine step (its tokens, then its finished requests); returns the requests the engine
        finished, and those a stop string ended that it still runs (abort them, and `finish` their Finished)."""
        lps, top_ids, top_lps = (
            None if a is None else a.tolist() for a in (out.logprobs, out.top_ids, out.top_logprobs)
        )
        hit = []
        for k, (rid, token) in enumerate(zip(out.req_ids.tolist(), out.tokens.tolist())):
            r = self.requests.get(rid)
            n = None if r is None or top_ids is None else r.params.logprobs  # top ones: only those it wants
            top = None if n is None else list(zip(top_ids[k][:n], top_lps[k][:n]))
            delta = self.on_token(rid, token, None if lps is None else lps[k], top)
            if delta is not None and r.stop.stopped is not None:
                hit.append(r)
        ended = [self.requests[f.req_id] for f in out.finished if f.req_id in self.requests]
        for f in out.finished:
            self.finish(f)
        return ended, [r for r in hit if r.req_id in self.requests]


# Text ------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token: int) -> str:
        """Appends one token; returns the newly complete text (possibly "")."""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""


class StopMatcher:
    """Tracks the text emitted so far against a set of stop strings."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include_stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all text seen
        self.emitted = 0  # chars of `text` released to the client
        self.stopped: str | None = None

    def push(self, delta: str) -> str:
        """Adds decoded text; returns what may be released now. Sets `stopped` when a stop string appears."""
        if self.stopped is not None:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stops:
            hits = [(self.text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                at, stop = min(hits)
                self.stopped = stop
                end = at + len(stop) if self.include else at
                out, self.text = self.text[self.emitted : end], self.text[:end]
                self.emitted = end
                return out
        safe = len(self.text) - self.hold if self.stops else len(self.text)
        out = self.text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of the output."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
