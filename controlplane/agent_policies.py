"""Agent-aware policies written in Python, through the public interface only.

The two published ideas are C++ (the fast path): ``session_las`` (ordering; Autellix's
program-level least attained service) and ``pause_aware`` (eviction/retention; Continuum's
and InferCept's hold-or-reload decision over a tool pause), both in csrc/policies.cpp. This
module holds the one of our own design, in Python to show that a Python policy is a
first-class citizen: registered here, it is selected by name from any config.

``cache_credit`` (ordering): earliest virtual deadline, where a request's deadline is its
arrival time plus the time its *uncached* prefill would take at ``tokens_per_s``.

Rationale. An agent's turn after a tool call finds nearly all of its 50K-token context in the
prefix cache and adds a few hundred tokens; the agent is blocked on it, so its latency is the
session's latency. A fresh session's first call must prefill its whole context. FCFS makes the
cheap, latency-critical turn wait behind the expensive one; longest-prefix-match (SGLang's
``lpm``) serves cached turns first but lets a cold request starve while cached ones keep
arriving; shortest-job-first starves long ones outright. A deadline of arrival + uncached
work / rate orders by work only within the window the work itself would take: a cold 50K
prompt yields to cached turns that arrive up to 2.5 s (at 20K tokens/s) after it, never
longer, so nobody starves and the bound is stated in seconds. No shipped engine orders by
this (vLLM: FCFS or priority; SGLang: lpm, dfs-weight, FCFS, LOF, random).
"""

from __future__ import annotations

from controlplane.policies import OrderingPolicy, register_policy


@register_policy("ordering", "cache_credit")
class CacheCredit(OrderingPolicy):
    """Earliest deadline first, deadline = arrival + uncached prefill tokens / tokens_per_s."""

    def __init__(self, tokens_per_s: float = 20000.0) -> None:
        super().__init__()
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        self.tokens_per_s = float(tokens_per_s)

    def needs_prefix_match(self) -> bool:
        return True

    def key(self, r):
        done = max(r.num_cached_tokens, r.num_computed_tokens)
        work = max(0, r.num_prompt_tokens + r.num_output_tokens - done)
        return (r.arrival_time + work / self.tokens_per_s, r.arrival_time)
