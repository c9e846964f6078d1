"""The engine-core process: receive requests, step the engine, send tokens, over ZMQ.

    while True:
        drain every waiting message (non-blocking if there is work, else wait up to 50 ms)
        if work: out = core.step(); send Tokens + Finished
        every 0.5 s: send Stats

It never parses HTTP, tokenizes or detokenizes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import zmq

from engine.serve import protocol as P

log = logging.getLogger("tandem.core")
STATS_INTERVAL_S = 0.5


class CoreLoop:
    def __init__(self, core, recv: zmq.Socket, send: zmq.Socket) -> None:
        self.core, self.recv, self.send = core, recv, send
        self.live: set[int] = set()
        self.aborted = 0
        self._last_stats = 0.0

    def handle(self, msg) -> bool:
        """Applies one message; False on Shutdown."""
        from engine.sampling import SamplingParams

        core = self.core
        if isinstance(msg, P.Add):
            try:
                core.add_request(msg.req_id, P.unpack_ids(msg.prompt), SamplingParams(**msg.params), session_id=msg.session_id,
                                 cache_namespace=msg.cache_namespace, priority=msg.priority)
            except (ValueError, TypeError) as exc:
                self.send.send(P.encode(P.Rejected(msg.req_id, str(exc))))
                return True
            self.live.add(msg.req_id)
        elif isinstance(msg, P.Abort):
            for rid in msg.req_ids:
                if rid in self.live:
                    info = core.scheduler.request_info(rid)
                    core.abort(rid)
                    self.live.discard(rid)
                    self.aborted += 1
                    self.send.send(P.encode(P.Finished(rid, "abort", None, info["num_prompt_tokens"],
                                                       info["num_cached_tokens"],
                                                       len(info["output_token_ids"]))))
        elif isinstance(msg, P.EndSession):
            core.scheduler.end_session(msg.session_id, core.clock.now())
        elif isinstance(msg, P.Shutdown):
            return False
        return True

    def step(self) -> None:
        from engine.core import finish_reason

        core = self.core
        out = core.step()
        if len(out.req_ids):
            result = core.runner.last_result
            tok = P.Tokens(out.req_ids.tolist(), out.tokens.tolist())
            if result is not None and result.logprobs is not None:
                tok.logprobs = result.logprobs.tolist()
                if result.top_ids is not None:
                    tok.top_ids, tok.top_logprobs = result.top_ids.tolist(), result.top_logprobs.tolist()
            tok.sent_at = time.perf_counter()
            self.send.send(P.encode(tok))
        for f in out.finished:
            self.live.discard(f.request_id)
            stop = f.output_token_ids[-1] if f.finish_reason == "stop" and f.num_output_tokens else None
            reason = finish_reason(f)
            self.send.send(P.encode(P.Finished(f.request_id, reason, stop, f.num_prompt_tokens,
                                               f.num_cached_tokens, f.num_output_tokens)))

    def stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        values = self.core.scheduler.stats().as_dict()
        values["num_aborted_by_gateway"] = self.aborted
        self.send.send(P.encode(P.Stats(values)))

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.recv, zmq.POLLIN)
        while True:
            busy = self.core.has_unfinished()
            events = dict(poller.poll(0 if busy else 50))
            while events.get(self.recv):
                if not self.handle(P.decode_to_core(self.recv.recv())):
                    return
                events = dict(poller.poll(0))
            if self.core.has_unfinished():
                self.step()
                # the last request just finished: report the idle state now, not up to 0.5 s later
                self.stats(force=not self.core.has_unfinished())
            else:
                self.stats()


def main(engine_options: dict, to_core: str, from_core: str) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(to_core)
    send = ctx.socket(zmq.PUSH)
    send.connect(from_core)
    try:
        from engine.config import EngineConfig
        from engine.core import EngineCore

        core = EngineCore(EngineConfig.from_dict(engine_options))
        send.send(P.encode(P.Ready(core.source, core.max_model_len, core.model_config.vocab_size, core.num_blocks,
                                   core.config.block_size, str(core.device))))
        CoreLoop(core, recv, send).run()
    except BaseException:  # noqa: BLE001 - report, then die with a non-zero status
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        send.close(linger=100)
        recv.close(linger=0)
