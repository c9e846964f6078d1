"""One choice of one request, from engine tokens to OpenAI text: detokenize, stop strings, logprobs, timing."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

from engine.serve.client import CoreClient, CoreDied
from engine.detokenize import IncrementalDetokenizer, StopMatcher
from engine.serve.openai_api import ApiError

_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_ids)


def params_dict(params) -> dict:
    """SamplingParams as the plain mapping the core process rebuilds it from."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


@dataclass
class Delta:
    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


class Choice:
    """Consumes one engine request's events and yields Deltas; aborts the request on a stop string."""

    def __init__(self, client: CoreClient, tokenizer, index: int, prompt_ids: list[int], params, *,
                 session_id: str | None, namespace: str | None, priority: int, metrics, prompt_index: int = 0) -> None:
        self.client, self.index, self.params, self.metrics = client, index, params, metrics
        self.prompt_index = prompt_index
        self.req_id = next_request_id()
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stop = StopMatcher(params.stop_list, params.include_stop_str_in_output)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.finish_reason: str | None = None
        self.disconnected = False  # set by the response when its client goes away: the metrics' reason
        self.text = ""
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.queue = client.add(self.req_id, prompt_ids, params_dict(params), session_id, namespace, priority)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def deltas(self):
        """Yields a Delta per engine event until the choice finishes (the last one has finish_reason)."""
        try:
            while not self.done:
                kind, a, lp, top = await self.queue.get()
                if kind == "token":
                    yield self._token(a, lp, top)
                elif kind == "finished":
                    yield self._finished(a)
                elif kind == "rejected":
                    self._end("error")
                    raise ApiError(a, param="prompt")
                else:
                    self._end("error")
                    raise CoreDied(self.client.death_message)
        finally:
            self.close()

    def close(self) -> None:
        """Ends the choice if it has not ended (its client went away, or the handler failed): the engine
        frees its KV now. Its response calls it too, for a choice whose task was cancelled before it ran."""
        if not self.done:
            self.client.abort([self.req_id])
            self._end("client_disconnect" if self.disconnected else "abort")
        self.client.release(self.req_id)

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.metrics.requests.labels(reason).inc()

    def _token(self, token: int, logprob, top) -> Delta:
        # a step carries logprobs for every row when any row asks for them: keep what this one asked for
        wanted = self.params.logprobs
        if wanted is None:
            logprob, top = None, None
        elif top is not None:
            top = top[:wanted]
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.start)
        if self.stop.stopped is not None:  # in flight past a stop string: not output, so no id and no count
            return Delta("")
        # from here the token is output: counted in usage and carried by its Delta (so by `token_ids`) even
        # when its text is "" (a skipped special token, part of a character, text a stop string holds back)
        self.num_output_tokens += 1
        text = self.detok.add(token) if self.detok else ""
        out = self.stop.push(text)
        delta = Delta(out, [token], [logprob] if logprob is not None else [], [top] if top is not None else [])
        if self.stop.stopped is not None:  # ends here; the core's tokens in flight are ignored
            self.client.abort([self.req_id])
        return delta

    def _finished(self, msg) -> Delta:
        self.num_cached_tokens = msg.num_cached_tokens
        tail = self.stop.flush() if self.stop.stopped is None else ""
        reason = "stop" if self.stop.stopped is not None else ("length" if msg.reason == "length" else "stop")
        self._end(reason)
        self.text = self.stop.text
        now = time.perf_counter()
        self.metrics.e2e.observe(now - self.start)
        if self.first_token_at is not None and self.num_output_tokens > 1:
            self.metrics.tpot.observe((now - self.first_token_at) / (self.num_output_tokens - 1))
        if msg.queue_time is not None:
            self.metrics.queue_time.observe(msg.queue_time)
        self.metrics.tokens_in.inc(self.num_prompt_tokens)
        self.metrics.tokens_out.inc(self.num_output_tokens)
        return Delta(tail, finish_reason=reason)
