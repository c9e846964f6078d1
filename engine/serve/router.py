"""The gateway's router over its engine cores: the simulator's RouterPolicy objects, fed what the twin feeds them.

`python -m engine.serve data_parallel_size=N cluster.router=prefix_aware` starts N cores; every model call
(each prompt of a request; its `n` choices go together) is routed by `cp.policies.Router(spec)`, the
object sim/cluster.py `Router` drives, over the live cores only. Each replica's view:

    load                   requests sent to it and not yet answered by Finished/Rejected (exact: the gateway
                           sends them all)
    cached_prefix_tokens   the prompt's chained block hashes (_core.prompt_block_hashes, namespace included)
                           matched against a shadow of the core's prefix index, kept from its KV events
    num_free_blocks        free + evictable blocks from its Stats (up to 0.5 s old)

Staleness and the rest: docs/serving.md, "Data-parallel serving".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import controlplane as cp
from controlplane import _core
from engine.serve.client import CoreClient, CoreDied

DEAD_LOAD = 1 << 30  # a dead core's load in the router's view


class ReplicaRouter:
    """Chooses an engine core for each model call and keeps which cores saw which session.

    Args:
        clients: one CoreClient per replica, `clients[i].index == i`.
        spec: a router policy spec (``policy_names("router")``, C++ or Python), as the simulator's
            `cluster.router`.
        block_size: the cores' KV block size (their hashes chain over blocks of it).
    """

    def __init__(self, clients: Sequence[CoreClient], spec: str = "round_robin", block_size: int = 16) -> None:
        self.clients = list(clients)
        self.spec = spec
        self.block_size = block_size
        self._router = cp.policies.Router(spec)
        self._prefix = self._router.needs_prefix_match
        self._calls = 0
        self._start = time.monotonic()
        self.sessions: dict[str, set[int]] = {}  # session id -> replicas a request of it was sent to

    @property
    def live(self) -> list[CoreClient]:
        return [c for c in self.clients if not c.dead]

    def views(self, clients: Sequence[CoreClient], prompt_ids, namespace: str | None) -> list:
        """What the router policy reads about each client, as sim/cluster.py `Router` builds it."""
        hashes: list[int] = []
        if self._prefix:  # the scheduler matches at most (len - 1) // B blocks: one token is always computed
            limit = (len(prompt_ids) - 1) // self.block_size
            hashes = _core.prompt_block_hashes(prompt_ids[: limit * self.block_size], self.block_size, namespace)
        out = []
        for c in clients:
            if c.dead:  # kept in the list so that indices (session_affinity's memory) stay put; never chosen
                out.append(cp.policies.ReplicaView(c.index, DEAD_LOAD, 0, c.info.num_blocks, 0))
                continue
            s = c.stats or {}
            free = s.get("num_free_blocks", c.info.num_blocks) + s.get("num_evictable_blocks", 0)
            out.append(
                cp.policies.ReplicaView(
                    c.index,
                    len(c.in_flight),
                    free,
                    c.info.num_blocks,
                    c.cached_prefix_blocks(hashes) * self.block_size if hashes else 0,
                )
            )
        return out

    def route(self, prompt_ids: Sequence[int], session_id: str | None, namespace: str | None = None) -> CoreClient:
        """The core that serves this call (raises CoreDied when none is running)."""
        live = self.live
        if not live:
            raise CoreDied("no engine core is running")
        if len(live) == 1:  # as the twin's Router: nothing to choose, the policy is not asked
            chosen = live[0]
        else:
            # every core, dead ones too, so that a policy's memory of positions (session_affinity) still
            # means the same cores; a dead one looks fully loaded, and if a policy picks it anyway (its turn
            # in round_robin, a session pinned there) the call goes to the least loaded live core
            self._calls += 1
            at = self._router.route(
                self._calls,
                session_id or "",
                len(prompt_ids),
                time.monotonic() - self._start,
                self.views(self.clients, prompt_ids, namespace),
            )
            chosen = self.clients[at]
            if chosen.dead:
                chosen = min(live, key=lambda c: (len(c.in_flight), c.index))
        if session_id:
            self.sessions.setdefault(session_id, set()).add(chosen.index)
        chosen.num_routed += 1
        return chosen

    async def end_session(self, session_id: str) -> bool:
        """Ends the session on every live core a request of it went to; False if none of them knew it.

        Raises:
            CoreDied: every core that had it has died.
        """
        self._router.end_session(session_id)
        holders = [self.clients[i] for i in sorted(self.sessions.pop(session_id, ()))]
        live = [c for c in holders if not c.dead]
        if holders and not live:
            raise CoreDied(
                f"session {session_id!r} was on engine core replica(s) "
                f"{', '.join(str(c.index) for c in holders)}, which died"
            )
        answers = await asyncio.gather(*(c.end_session(session_id) for c in live), return_exceptions=True)
        if any(a is True for a in answers):
            return True
        failed = [c.index for c, a in zip(live, answers) if isinstance(a, BaseException)]
        if failed:  # a core that may have held it could not answer: not a 404
            raise CoreDied(
                f"session {session_id!r}: engine core replica(s) {', '.join(map(str, failed))} did not answer"
            )
        return False
