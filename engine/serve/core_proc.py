"""The engine-core process: receive requests, step the engine, send tokens, over ZMQ.

    while True:
        drain every waiting message (non-blocking if there is work, else wait up to 50 ms)
        if work: out = core.step(); send Tokens + Finished
        every 0.5 s: send Stats

It never parses HTTP, tokenizes or detokenizes, and it dies with the gateway that spawned it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback

import zmq

from engine.serve import protocol as P

log = logging.getLogger("tandem.core")
STATS_INTERVAL_S = 0.5
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class CoreLoop:
    def __init__(self, core, recv: zmq.Socket, send: zmq.Socket) -> None:
        self.core, self.recv, self.send = core, recv, send
        # sessions with a request here and not ended since: the scheduler keeps no such set that it shows,
        # and POST /v1/sessions/{id}/end must tell an unknown id from a known one
        self.sessions: set[str] = set()
        self.aborted = 0
        self._last_stats = 0.0
        self.forward_kv_events = core.kept_kv_events is not None  # a data-parallel gateway's prefix shadow

    def handle(self, msg) -> bool:
        """Applies one message; False on Shutdown."""
        from engine.sampling import SamplingParams

        core = self.core
        if isinstance(msg, P.Add):
            try:
                core.add_request(
                    msg.req_id,
                    P.unpack_ids(msg.prompt),
                    SamplingParams(**msg.params),
                    session_id=msg.session_id,
                    cache_namespace=msg.cache_namespace,
                    priority=msg.priority,
                )
            except (ValueError, TypeError) as exc:
                self.send.send(P.encode(P.Rejected(msg.req_id, str(exc))))
                return True
            if msg.session_id:
                self.sessions.add(msg.session_id)
        elif isinstance(msg, P.Abort):
            for rid in msg.req_ids:
                finished = core.abort(rid)  # None: it finished (or was aborted) already
                if finished is not None:
                    self.aborted += 1
                    self.send.send(P.encode(finished))
        elif isinstance(msg, P.EndSession):
            core.end_session(msg.session_id)
            known = msg.session_id in self.sessions
            self.sessions.discard(msg.session_id)
            self.send.send(P.encode(P.SessionEnded(msg.session_id, known)))
        elif isinstance(msg, P.Shutdown):
            return False
        return True

    def send_kv_events(self) -> None:
        """Sends what entered and left the prefix index since the last call (ahead of the step's outputs)."""
        if not self.forward_kv_events:
            return
        self.core.drain_kv_events()
        events, self.core.kept_kv_events = self.core.kept_kv_events, []
        if events:
            self.send.send(P.encode(P.KvEvents([(kind, list(hashes)) for kind, hashes, _, _ in events])))

    def step(self) -> None:
        out = self.core.step()
        self.send_kv_events()
        if len(out.req_ids):
            logprobs = (None if a is None else a.tolist() for a in (out.logprobs, out.top_ids, out.top_logprobs))
            tok = P.Tokens(out.req_ids.tolist(), out.tokens.tolist(), 0.0, *logprobs)
            tok.sent_at = time.perf_counter()
            self.send.send(P.encode(tok))
        for f in out.finished:
            self.send.send(P.encode(f))

    def stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        values = self.core.stats().as_dict()
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
            self.send_kv_events()  # an abort can change the index too
            if self.core.has_unfinished():
                self.step()
                # the last request just finished: report the idle state now, not up to 0.5 s later
                self.stats(force=not self.core.has_unfinished())
            else:
                self.stats()


def exit_with_parent(parent_pid: int) -> None:
    """Dies with the gateway, however it dies: a SIGKILLed gateway cleans nothing up, and its core would
    run on, re-parented, holding its memory (and GPU).

    Linux: PR_SET_PDEATHSIG has the kernel SIGKILL us when the thread that spawned us exits (the
    gateway's event-loop thread, which lives as long as the gateway). Everywhere: a thread that
    exits once the parent pid changes, which also covers a parent that died before the prctl.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(
    engine_options: dict,
    to_core: str,
    from_core: str,
    parent_pid: int,
    keep_kv_events: bool = False,
    cuda_devices: str | None = None,
) -> None:
    """Entry point of the spawned process.

    Args:
        keep_kv_events: send the prefix index's KV events to the gateway (KvEvents), for its router.
        cuda_devices: this core's CUDA_VISIBLE_DEVICES (a data-parallel replica's GPU); None: inherited.
    """
    if cuda_devices is not None:  # before anything initializes CUDA (torch reads it at its first CUDA call)
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices
    exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.connect(to_core)
    send = ctx.socket(zmq.PUSH)
    send.connect(from_core)
    try:
        from engine.config import EngineConfig
        from engine.core import EngineCore
        from engine.memory import block_bytes

        core = EngineCore(EngineConfig.from_dict(engine_options))
        if keep_kv_events:
            core.keep_kv_events()
        bs = core.config.scheduler.block_size
        send.send(
            P.encode(
                P.Ready(
                    core.source,
                    core.max_model_len,
                    core.model_config.vocab_size,
                    core.num_blocks,
                    bs,
                    str(core.device),
                    str(core.dtype).removeprefix("torch."),
                    core.num_blocks * block_bytes(core.model, bs, core.kv_dtype),
                    core.config.kv_cache_dtype,
                    core.quantization,
                    core.idle_chunk_size,
                )
            )
        )
        CoreLoop(core, recv, send).run()
        core.close()  # KV events still queued are sent
    except BaseException:  # noqa: BLE001 - report, then die with a non-zero status
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        send.close(linger=100)
        recv.close(linger=0)
