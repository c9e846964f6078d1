"""Example Python policies, one of each kind: the ones docs/policies.md walks through.

Import this module to register them (``scheduler.policy_modules=[controlplane.examples]`` in a
simulation or the server, ``LLM(policy_modules=[...])`` for the engine);
the conformance suite runs them like every other registered policy.
"""

from __future__ import annotations

import math

from controlplane.policies import EvictionPolicy, OrderingPolicy, PreemptionPolicy, RouterPolicy, register_policy


@register_policy("ordering", "short_prefill_first")
class ShortPrefillFirst(OrderingPolicy):
    """Least uncached prompt first (arrival breaks ties): the cheapest admission goes first."""

    def needs_prefix_match(self) -> bool:
        return True  # num_cached_tokens of waiting requests is then their prefix hit now

    def key(self, r):
        return (r.num_prompt_tokens - r.num_cached_tokens, r.arrival_time)


@register_policy("eviction", "hit_weighted_lru")
class HitWeightedLru(EvictionPolicy):
    """LRU where each prefix hit buys `bonus_s` seconds of recency (log-scaled): shared prefixes stay."""

    def __init__(self, bonus_s: float = 5.0) -> None:
        super().__init__()
        if bonus_s < 0:
            raise ValueError(f"bonus_s must be >= 0, got {bonus_s}")
        self.bonus_s = bonus_s

    def key(self, block):
        return block.last_access + self.bonus_s * math.log1p(block.hits)


@register_policy("preemption", "swap_long")
class SwapLong(PreemptionPolicy):
    """Swap a victim out if it holds at least `min_blocks` blocks (recomputing it would cost more than the copy)."""

    def __init__(self, min_blocks: float = 4) -> None:
        super().__init__()
        self.min_blocks = min_blocks

    def mode(self, victim, host_free_blocks, blocks_needed):
        if blocks_needed >= self.min_blocks and host_free_blocks >= blocks_needed:
            return "swap"
        return "recompute"


@register_policy("router", "most_free_kv")
class MostFreeKv(RouterPolicy):
    """The replica with the most free or evictable KV blocks; ties: least loaded, then lowest index."""

    def route(self, call, replicas):
        best = max(replicas, key=lambda r: (r.num_free_blocks, -r.load, -r.index))
        return replicas.index(best)
