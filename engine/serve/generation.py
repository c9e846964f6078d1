"""One choice of one request: sent to an engine core, its events turned into Deltas by the gateway's output
processor (engine/output.py), its latencies recorded."""

from __future__ import annotations

import dataclasses
import itertools
import time

from engine.output import Delta, OutputProcessor
from engine.serve.client import CoreClient, CoreDied
from engine.serve.openai_api import ApiError

_ids = itertools.count(1)  # request ids, unique in the gateway


def params_dict(params) -> dict:
    """SamplingParams as the plain mapping the core process rebuilds it from."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


class Choice:
    """Consumes one engine request's events and yields Deltas; aborts the request on a stop string. Its output
    (text, tokens, logprobs, counts, finish reason) is `request`, the output processor's record."""

    def __init__(
        self,
        client: CoreClient,
        outputs: OutputProcessor,
        index: int,
        prompt_ids: list[int],
        params,
        *,
        session_id: str | None,
        namespace: str | None,
        priority: int,
        metrics,
        prompt_index: int = 0,
    ) -> None:
        self.client, self.outputs, self.index, self.metrics = client, outputs, index, metrics
        self.prompt_index = prompt_index
        self.req_id = next(_ids)
        self.outcome: str | None = None  # the metrics' finish_reason: the output's, abort, client_disconnect, error
        self.disconnected = False  # set by the response when its client goes away: the metrics' reason
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.queue = client.add(self.req_id, prompt_ids, params_dict(params), session_id, namespace, priority)
        self.request = outputs.add(self.req_id, params, len(prompt_ids))  # once sent: released in close()

    @property
    def done(self) -> bool:
        return self.outcome is not None

    async def deltas(self):
        """Yields a Delta per engine event until the choice finishes (the last one has finish_reason)."""
        try:
            while not self.done:
                kind, a, lp, top = await self.queue.get()
                if kind == "token":
                    delta = self._token(a, lp, top)
                    if delta is not None:  # None: in flight past a stop string, not output
                        yield delta
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
        self.release()

    def release(self) -> None:
        """Forgets the choice here: its event queue and its output record."""
        self.client.release(self.req_id)
        self.outputs.release(self.req_id)

    def _end(self, reason: str) -> None:
        self.outcome = reason
        self.metrics.requests.labels(reason).inc()

    def _token(self, token: int, logprob, top) -> Delta | None:
        if self.first_token_at is None:
            self.first_token_at = now = time.perf_counter()
            self.metrics.ttft.observe(now - self.start)
        delta = self.outputs.on_token(self.req_id, token, logprob, top)
        if delta is not None and self.request.stop.stopped is not None:  # ends here; the tokens in flight are ignored
            self.client.abort([self.req_id])
        return delta

    def _finished(self, msg) -> Delta:
        delta = self.outputs.finish(msg)
        self._end(self.request.finish_reason)
        now, n = time.perf_counter(), len(self.request.tokens)
        self.metrics.e2e.observe(now - self.start)
        if self.first_token_at is not None and n > 1:
            self.metrics.tpot.observe((now - self.first_token_at) / (n - 1))
        if msg.queue_time is not None:
            self.metrics.queue_time.observe(msg.queue_time)
        self.metrics.tokens_in.inc(self.request.num_prompt_tokens)
        self.metrics.tokens_out.inc(n)
        return delta
