"""The gateway's handle on the engine-core process: spawn it, send it requests, route its replies.

Each request gets an asyncio.Queue of events: ("token", id, logprob, top), ("finished", Finished),
("rejected", message) or ("dead", None) when the core process has died. Ending a session waits for
the core's SessionEnded, which says whether the core knew it. A data-parallel gateway has one client
per core (`index`): each knows its requests in flight and, from the core's KvEvents, the block hashes
of its prefix index (`cached_hashes`), which its router reads (engine/serve/router.py).
"""

from __future__ import annotations

import asyncio
import collections
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
    """Starts `core_proc.main` in a spawned process and talks to it over two ipc:// sockets.

    Args:
        engine_options: EngineConfig fields.
        index: the replica number (data-parallel serving; 0 otherwise).
        keep_kv_events: have the core send its KV events, kept in `cached_hashes`.
        cuda_devices: the core's CUDA_VISIBLE_DEVICES (None: inherited).
    """

    def __init__(
        self, engine_options: dict, index: int = 0, keep_kv_events: bool = False, cuda_devices: str | None = None
    ) -> None:
        self.engine_options = dict(engine_options)
        self.index = index
        self.keeps_kv_events = keep_kv_events  # data-parallel: one of several cores
        self.cuda_devices = cuda_devices
        self._dir = tempfile.mkdtemp(prefix="tandem-ipc-")
        self.to_addr = f"ipc://{os.path.join(self._dir, 'to-core')}"
        self.from_addr = f"ipc://{os.path.join(self._dir, 'from-core')}"
        self.ctx = zmq.asyncio.Context()
        self.to_core = self.ctx.socket(zmq.PUSH)
        self.to_core.bind(self.to_addr)
        self.from_core = self.ctx.socket(zmq.PULL)
        self.from_core.bind(self.from_addr)
        self.proc = multiprocessing.get_context("spawn").Process(
            target=core_proc.main,
            args=(self.engine_options, self.to_addr, self.from_addr, os.getpid(), keep_kv_events, cuda_devices),
            daemon=True,
        )
        self.queues: dict[int, asyncio.Queue] = {}
        # requests sent and not yet answered by Finished or Rejected: the router's load, as the twin's
        # Replica.load (the core's own count, one message behind at most)
        self.in_flight: set[int] = set()
        self.cached_hashes: set[int] = set()  # the core's prefix index, from its KvEvents (keep_kv_events)
        self.num_routed = 0
        # session id -> futures of its EndSessions in flight, in the order sent (the core answers in order)
        self.session_ends: dict[str, collections.deque[asyncio.Future]] = {}
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
        i = self.info
        log.info(
            "engine core%s ready: %s on %s, %s (KV cache %s, weights %s), %d KV blocks of %d tokens (%.2f GiB), "
            "max_model_len %d",
            f" replica {self.index} (pid {self.proc.pid})" if self.keeps_kv_events else "",
            os.path.basename(os.path.normpath(i.model)),
            i.device,
            i.dtype,
            i.kv_cache_dtype,
            i.quantization,
            i.num_blocks,
            i.block_size,
            i.kv_bytes / 2**30,
            i.max_model_len,
        )
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._watch())]
        return self.info

    @property
    def death_message(self) -> str:
        return f"engine core replica {self.index} died (exit status {self.proc.exitcode})"

    def _send(self, msg) -> None:
        if self.dead:
            raise CoreDied(f"engine core replica {self.index} is not running")
        self.to_core.send(P.encode(msg))

    def add(
        self,
        req_id: int,
        prompt_ids: list[int],
        params: dict,
        session_id: str | None,
        cache_namespace: str | None,
        priority: int = 0,
    ) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[req_id] = queue
        self.in_flight.add(req_id)
        self._send(P.Add(req_id, P.pack_ids(prompt_ids), params, session_id, cache_namespace, priority))
        return queue

    def abort(self, req_ids: list[int]) -> None:
        live = [r for r in req_ids if r in self.queues]
        if live and not self.dead:
            self._send(P.Abort(live))

    def release(self, req_id: int) -> None:
        self.queues.pop(req_id, None)

    async def end_session(self, session_id: str) -> bool:
        """Ends the session in the core; False if the core did not know it (never seen, or already ended)."""
        self._send(P.EndSession(session_id))
        answer = asyncio.get_running_loop().create_future()
        self.session_ends.setdefault(session_id, collections.deque()).append(answer)
        return await answer

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
            elif isinstance(msg, P.KvEvents):
                self._apply_kv_events(msg.events)
            elif isinstance(msg, P.Finished):
                self.in_flight.discard(msg.req_id)
                q = self.queues.get(msg.req_id)
                if q is not None:
                    q.put_nowait(("finished", msg, None, None))
            elif isinstance(msg, P.Rejected):
                self.in_flight.discard(msg.req_id)
                q = self.queues.get(msg.req_id)
                if q is not None:
                    q.put_nowait(("rejected", msg.message, None, None))
            elif isinstance(msg, P.SessionEnded):
                waiting = self.session_ends.get(msg.session_id)
                if waiting:
                    answer = waiting.popleft()
                    if not answer.done():  # its HTTP request may have gone
                        answer.set_result(msg.known)
                    if not waiting:
                        del self.session_ends[msg.session_id]
            elif isinstance(msg, P.Stats):
                self.stats = msg.values

    def _apply_kv_events(self, events: list) -> None:
        for kind, hashes in events:
            if kind == "BlockStored":
                self.cached_hashes.update(hashes)
            elif kind == "BlockRemoved":
                self.cached_hashes.difference_update(hashes)
            else:  # AllBlocksCleared
                self.cached_hashes.clear()

    def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """Leading blocks of a prompt (its chained hashes) that the core's prefix index holds."""
        n = 0
        for h in block_hashes:
            if h not in self.cached_hashes:
                break
            n += 1
        return n

    async def _watch(self) -> None:
        while self.proc.is_alive():
            await asyncio.sleep(0.2)
        self.dead = True
        self.in_flight.clear()
        log.error("%s", self.death_message)
        for q in self.queues.values():
            q.put_nowait(("dead", None, None, None))
        for waiting in self.session_ends.values():
            for answer in waiting:
                if not answer.done():
                    answer.set_exception(CoreDied(self.death_message))
        if self.on_death is not None:
            self.on_death(self)

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
