"""Prometheus metrics: the engine core's counters (from its Stats messages) and the gateway's latencies."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


_GAUGES = ("num_running", "num_waiting", "num_preempted", "num_free_blocks", "num_used_blocks")


class _CoreCollector:
    """The cores' Stats as Prometheus families: with one core unlabeled, with several one sample per core
    labeled `replica` (a dead core's gauges read 0, its counters keep their last value)."""

    def __init__(self, clients) -> None:
        self.clients = list(clients)

    def _stats(self, client) -> dict:
        s = dict(client.stats or {})
        if getattr(client, "dead", False):
            s.update({k: 0 for k in _GAUGES})
            s["num_free_blocks"] = s.get("num_blocks", 0)
        return s

    def collect(self):
        per = [self._stats(c) for c in self.clients]
        total = {
            k: sum(s.get(k, 0) for s in per)
            for k in set().union(*per)
            if all(isinstance(s.get(k, 0), (int, float)) for s in per)
        }
        labeled = len(self.clients) > 1
        # several cores: one sample per core only (PromQL's sum() gives the total; an unlabeled total beside
        # them would be counted twice)
        rows = [([str(c.index)], s) for c, s in zip(self.clients, per)] if labeled else [([], total)]

        def family(kind, name, doc, value):
            f = kind(f"tandem_{name}", doc, labels=["replica"] if labeled else None)
            for labels, s in rows:
                f.add_metric(labels, float(value(s)))
            return f

        def ratio(s):
            blocks = max(s.get("num_blocks", 1), 1)
            return 1.0 - s.get("num_free_blocks", blocks) / blocks

        def hit_rate(s):
            prompt = s.get("prompt_tokens", 0)
            return s.get("cached_tokens", 0) / prompt if prompt else 0.0

        G, C = GaugeMetricFamily, CounterMetricFamily
        yield family(G, "num_requests_running", "requests prefilling or decoding", lambda s: s.get("num_running", 0))
        yield family(
            G,
            "num_requests_waiting",
            "requests waiting or preempted",
            lambda s: s.get("num_waiting", 0) + s.get("num_preempted", 0),
        )
        yield family(G, "kv_cache_usage_ratio", "share of KV blocks held by requests or the prefix cache", ratio)
        yield family(G, "kv_cache_used_blocks", "KV blocks in use", lambda s: s.get("num_used_blocks", 0))
        yield family(G, "kv_cache_total_blocks", "KV blocks of the engine", lambda s: s.get("num_blocks", 0))
        yield family(G, "prefix_cache_hit_rate", "cached prompt tokens over prompt tokens", hit_rate)
        yield family(
            C,
            "prefix_cache_hit_tokens",
            "prompt tokens served from the prefix cache",
            lambda s: s.get("cached_tokens", 0),
        )
        yield family(C, "prompt_tokens", "prompt tokens of admitted requests", lambda s: s.get("prompt_tokens", 0))
        yield family(C, "generation_tokens", "tokens generated", lambda s: s.get("generated_tokens", 0))
        yield family(
            C,
            "preemptions",
            "requests preempted (recompute + swap)",
            lambda s: s.get("num_preemptions_recompute", 0) + s.get("num_preemptions_swap", 0),
        )
        yield family(
            C, "evicted_blocks", "KV blocks evicted from the prefix cache", lambda s: s.get("num_evicted_blocks", 0)
        )
        yield family(
            C,
            "admission_cuts",
            "prefill chunks the admission policy cut or refused (scheduler.admission)",
            lambda s: s.get("num_admission_cuts", 0),
        )
        yield family(
            C,
            "admission_held_too_long",
            "requests the admission policy held past its max_wait_s, admitted since",
            lambda s: s.get("num_held_too_long", 0),
        )
        yield family(
            G,
            "admission_held_waiting",
            "requests the admission policy holds that have waited past its max_wait_s",
            lambda s: s.get("num_held_waiting", 0),
        )
        info = getattr(self.clients[0], "info", None)
        if info is not None:  # what every core runs
            model = GaugeMetricFamily(
                "tandem_model_info",
                "1; the labels say the model and its precision",
                labels=["model", "dtype", "kv_cache_dtype", "quantization"],
            )
            model.add_metric(
                [os.path.basename(os.path.normpath(info.model)), info.dtype, info.kv_cache_dtype, info.quantization],
                1.0,
            )
            yield model
        if labeled:
            yield from self._router_families()

    def _router_families(self):
        """What the gateway's router knows of each core (data-parallel serving only)."""
        up = GaugeMetricFamily("tandem_replica_up", "1 while the engine core runs", labels=["replica"])
        load = GaugeMetricFamily(
            "tandem_replica_requests_in_flight",
            "requests sent to the core and not answered (the router's load)",
            labels=["replica"],
        )
        cached = GaugeMetricFamily(
            "tandem_replica_cached_blocks",
            "blocks in the gateway's shadow of the core's prefix index",
            labels=["replica"],
        )
        routed = CounterMetricFamily("tandem_replica_routed", "model calls routed to the core", labels=["replica"])
        for c in self.clients:
            label = [str(c.index)]
            up.add_metric(label, 0.0 if c.dead else 1.0)
            load.add_metric(label, float(len(c.in_flight)))
            cached.add_metric(label, float(len(c.cached_hashes)))
            routed.add_metric(label, float(c.num_routed))
        yield from (up, load, cached, routed)


class Metrics:
    """The gateway's registry. `clients`: its engine cores (a list), or the one core."""

    def __init__(self, clients) -> None:
        clients = list(clients) if isinstance(clients, (list, tuple)) else [clients]
        self.registry = CollectorRegistry()
        self.registry.register(_CoreCollector(clients))
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "time to first token",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds",
            "time per output token after the first",
            registry=self.registry,
            buckets=_TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds", "request latency", registry=self.registry, buckets=_LATENCY_BUCKETS
        )
        self.ipc = Histogram(
            "tandem_ipc_token_latency_seconds",
            "engine core sends a step's tokens -> the gateway has them (ZMQ + decode)",
            registry=self.registry,
            buckets=(2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
        )
        for client in clients:
            client.on_tokens_latency = self.ipc.observe
        self.queue_time = Histogram(
            "tandem_request_queue_time_seconds",
            "arrival at the engine -> first scheduled (finished requests)",
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        # stop, length; abort (the server gave up: a stop string, a failed request), client_disconnect, error
        self.requests = Counter(
            "tandem_requests", "requests by how they ended", ["finish_reason"], registry=self.registry
        )
        self.tokens_in = Counter(
            "tandem_request_prompt_tokens", "prompt tokens of served requests", registry=self.registry
        )
        self.tokens_out = Counter(
            "tandem_request_generation_tokens", "generated tokens of served requests", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
