"""The gateway's handle on the engine-core process: spawn it, send it requests, route its replies.

Each request gets an asyncio.Queue of events: ("token", id, logprob, top), ("finished", Finished),
("rejected", message) or ("dead", None) when the core process has died.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import time

import zmq
import zmq.asyncio

from engine.serve import core_proc
from engine.serve import protocol as P

log = logging.getLogger("tandem.gateway")


class CoreDied(RuntimeError):
    pass


class CoreClient:
    """Starts `core_proc.main` in a spawned process and talks to it over two ipc:// sockets."""

    def __init__(self, engine_options: dict) -> None:
        self.engine_options = dict(engine_options)
        self._dir = tempfile.mkdtemp(prefix="tandem-ipc-")
        self.to_addr = f"ipc://{os.path.join(self._dir, 'to-core')}"
        self.from_addr = f"ipc://{os.path.join(self._dir, 'from-core')}"
        self.ctx = zmq.asyncio.Context()
        self.to_core = self.ctx.socket(zmq.PUSH)
        self.to_core.bind(self.to_addr)
        self.from_core = self.ctx.socket(zmq.PULL)
        self.from_core.bind(self.from_addr)
        self.proc = multiprocessing.get_context("spawn").Process(
            target=core_proc.main, args=(self.engine_options, self.to_addr, self.from_addr), daemon=True)
        self.queues: dict[int, asyncio.Queue] = {}
        self.stats: dict = {}
        self.info: P.Ready | None = None
        self.dead = False
        self.on_death = None
        self.on_tokens_latency = None  # called with (seconds from the core's send to our receive)
        self._tasks: list[asyncio.Task] = []

    async def start(self, timeout_s: float = 600.0) -> P.Ready:
        """Spawns the core and waits for its Ready (or its death)."""
        self.proc.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if await self.from_core.poll(200):
                msg = P.decode_from_core(await self.from_core.recv())
                if isinstance(msg, P.Ready):
                    self.info = msg
                    break
            if not self.proc.is_alive():
                raise CoreDied(f"the engine core exited with status {self.proc.exitcode} while starting")
            if loop.time() > deadline:
                raise CoreDied(f"the engine core did not start within {timeout_s} s")
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]
        return self.info

    def _send(self, msg) -> None:
        if self.dead:
            raise CoreDied("the engine core is not running")
        self.to_core.send(P.encode(msg))

    def add(self, req_id: int, prompt_ids: list[int], params: dict, session_id: str | None,
            cache_namespace: str | None, priority: int = 0) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[req_id] = queue
        self._send(P.Add(req_id, P.pack_ids(prompt_ids), params, session_id, cache_namespace, priority))
        return queue

    def abort(self, req_ids: list[int]) -> None:
        live = [r for r in req_ids if r in self.queues]
        if live and not self.dead:
            self._send(P.Abort(live))

    def release(self, req_id: int) -> None:
        self.queues.pop(req_id, None)

    def end_session(self, session_id: str) -> None:
        self._send(P.EndSession(session_id))

    async def _pump(self) -> None:
        while True:
            msg = P.decode_from_core(await self.from_core.recv())
            if isinstance(msg, P.Tokens):
                if self.on_tokens_latency is not None and msg.sent_at:
                    self.on_tokens_latency(time.perf_counter() - msg.sent_at)
                for k, (rid, tok) in enumerate(zip(msg.req_ids, msg.tokens)):
                    q = self.queues.get(rid)
                    if q is None:
                        continue
                    lp = msg.logprobs[k] if msg.logprobs is not None else None
                    top = list(zip(msg.top_ids[k], msg.top_logprobs[k])) if msg.top_ids is not None else None
                    q.put_nowait(("token", tok, lp, top))
            elif isinstance(msg, P.Finished):
                q = self.queues.get(msg.req_id)
                if q is not None:
                    q.put_nowait(("finished", msg, None, None))
            elif isinstance(msg, P.Rejected):
                q = self.queues.get(msg.req_id)
                if q is not None:
                    q.put_nowait(("rejected", msg.message, None, None))
            elif isinstance(msg, P.Stats):
                self.stats = msg.values

    async def _watch(self) -> None:
        while self.proc.is_alive():
            await asyncio.sleep(0.2)
        self.dead = True
        log.error("the engine core died (exit status %s)", self.proc.exitcode)
        for q in self.queues.values():
            q.put_nowait(("dead", None, None, None))
        if self.on_death is not None:
            self.on_death()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.proc.is_alive():
            try:
                self.to_core.send(P.encode(P.Shutdown()))
            except zmq.ZMQError:
                pass
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
        self.to_core.close(linger=0)
        self.from_core.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
