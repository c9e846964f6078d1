"""Prometheus metrics: the engine core's counters (from its Stats messages) and the gateway's latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _CoreCollector:
    def __init__(self, client) -> None:
        self.client = client

    def collect(self):
        s = self.client.stats or {}

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"tandem_{name}", doc)
            g.add_metric([], float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"tandem_{name}", doc)
            c.add_metric([], float(value))
            return c

        blocks = max(s.get("num_blocks", 1), 1)
        prompt, cached = s.get("prompt_tokens", 0), s.get("cached_tokens", 0)
        yield gauge("num_requests_running", "requests prefilling or decoding", s.get("num_running", 0))
        yield gauge("num_requests_waiting", "requests waiting or preempted", s.get("num_waiting", 0)
                    + s.get("num_preempted", 0))
        yield gauge("kv_cache_usage_ratio", "share of KV blocks held by requests or the prefix cache",
                    1.0 - s.get("num_free_blocks", blocks) / blocks)
        yield gauge("kv_cache_used_blocks", "KV blocks in use", s.get("num_used_blocks", 0))
        yield gauge("prefix_cache_hit_rate", "cached prompt tokens over prompt tokens", cached / prompt if prompt else 0.0)
        yield counter("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", cached)
        yield counter("prompt_tokens", "prompt tokens of admitted requests", prompt)
        yield counter("generation_tokens", "tokens generated", s.get("generated_tokens", 0))
        yield counter("preemptions", "requests preempted (recompute + swap)",
                      s.get("num_preemptions_recompute", 0) + s.get("num_preemptions_swap", 0))
        yield counter("evicted_blocks", "KV blocks evicted from the prefix cache", s.get("num_evicted_blocks", 0))


class Metrics:
    def __init__(self, client) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CoreCollector(client))
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "time to first token", registry=self.registry,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "time per output token after the first",
                              registry=self.registry, buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "request latency", registry=self.registry,
                             buckets=_LATENCY_BUCKETS)
        self.ipc = Histogram("tandem_ipc_token_latency_seconds",
                             "engine core sends a step's tokens -> the gateway has them (ZMQ + decode)",
                             registry=self.registry, buckets=(2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2))
        client.on_tokens_latency = self.ipc.observe
        self.requests = Counter("tandem_requests", "finished requests by reason", ["finish_reason"],
                                registry=self.registry)
        self.tokens_in = Counter("tandem_request_prompt_tokens", "prompt tokens of served requests",
                                 registry=self.registry)
        self.tokens_out = Counter("tandem_request_generation_tokens", "generated tokens of served requests",
                                  registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
