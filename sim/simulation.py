"""A whole simulated cluster: workload sessions -> router -> replicas on the shared control plane.

    result = Simulation(config).run()
    result.summary["ttft_s_p50"], result.requests  # figures and the per-request table

Token ids are synthetic but consistent: a session starts with its shared prefix
(the same ids for every session with that prefix id), and each call's prompt is
exactly the previous prompt + the previous output + the call's new tokens, so
the prefix cache sees real reuse.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import simpy

import controlplane as cp
from sim.cluster import Replica, Router
from sim.cluster_fast import ClusterDriver
from sim.config import SimulationConfig, from_mapping, scheduler_config, validate
from sim.cost import make_cost_model
from sim.lookahead import Lookahead, LookaheadConfig, merge_lookahead
from sim.metrics import Collector, Slo, overload_warnings
from sim.specs import HardwareSpec, ModelSpec, hardware_label, kv_capacity_blocks
from sim.workloads import Session, make_workload


class TokenFactory:
    """Deterministic synthetic token ids: shared prefixes by id, new tokens per session."""

    def __init__(self, seed: int, vocab_size: int) -> None:
        self.seed = seed
        self.vocab_size = vocab_size
        self._prefixes: dict[int, np.ndarray] = {}

    def prefix(self, prefix_id: int, length: int) -> np.ndarray:
        if prefix_id < 0 or length <= 0:
            return np.empty(0, dtype=np.int32)
        key = (prefix_id, length)
        if key not in self._prefixes:
            rng = np.random.default_rng([self.seed, 0x5EED, prefix_id, length])
            self._prefixes[key] = rng.integers(0, self.vocab_size, size=length, dtype=np.int32)
        return self._prefixes[key]

    def session_rng(self, session_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0x5E55, session_index])

    def new_tokens(self, rng: np.random.Generator, turn) -> np.ndarray:
        if turn.new_token_ids is not None:
            return np.asarray(turn.new_token_ids, dtype=np.int32)
        return rng.integers(0, self.vocab_size, size=turn.new_tokens, dtype=np.int32)

    def session_new_tokens(self, rng: np.random.Generator, turns) -> list[np.ndarray]:
        """`new_tokens(rng, turn)` for each turn in order, drawn in one call: numpy's bounded
        integers take the bit generator's stream in order whatever the call sizes, so the ids
        are those of one call per turn (tests/test_sim.py checks it), without a call's fixed cost
        (~12 us) per model call."""
        sizes = [t.new_tokens for t in turns if t.new_token_ids is None]
        drawn = rng.integers(0, self.vocab_size, size=sum(sizes), dtype=np.int32)
        out, at = [], 0
        for t in turns:
            if t.new_token_ids is not None:
                out.append(self.new_tokens(rng, t))  # a trace's own ids: no draw
            else:
                out.append(drawn[at : at + t.new_tokens])
                at += t.new_tokens
        return out


class SessionContext:
    """A session's token context (shared prefix, then each call's new tokens and output) in one
    buffer whose capacity doubles, so that a call's prompt (context + new tokens) costs a copy
    of the new tokens rather than of the whole ~50K-token context."""

    def __init__(self, prefix: np.ndarray) -> None:
        self._buf = np.empty(max(1024, 2 * prefix.size), dtype=np.int32)
        self._buf[: prefix.size] = prefix
        self.size = prefix.size

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        """Appends `tokens`; returns the whole context (a view, valid until the next extend)."""
        end = self.size + tokens.size
        if end > self._buf.size:
            grown = np.empty(max(end, 2 * self._buf.size), dtype=np.int32)
            grown[: self.size] = self._buf[: self.size]
            self._buf = grown
        self._buf[self.size : end] = tokens
        self.size = end
        return self._buf[:end]


@dataclass
class SimResult:
    config: SimulationConfig
    summary: dict
    collector: Collector
    kv_blocks_per_replica: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a heavily overloaded run (sim.metrics.overload_warnings)

    @property
    def requests(self):
        return self.collector.request_table()


class Simulation:
    """Builds and runs one simulation; bad configuration fails here, before any simulated time.

    Args:
        config: a SimulationConfig or nested mappings of its sections.
        sessions: replay these sessions (sorted by start time) instead of the workload's; the
            workload section is then only checked (e.g. a search's generated traces, experiments.adversary).
    """

    def __init__(self, config, sessions: list[Session] | None = None) -> None:
        cfg = from_mapping(config)
        validate(cfg)
        self.sessions = None if sessions is None else sorted(sessions, key=lambda x: x.start_time)
        self.cfg = cfg
        self.model = ModelSpec(**vars(cfg.model))
        self.hardware = HardwareSpec(**vars(cfg.hardware))
        self.hardware_label = hardware_label(self.hardware)
        e, block_size = cfg.engine, cfg.scheduler.block_size
        labelled = dataclasses.replace(self.hardware, name=self.hardware_label)  # for its messages
        self.num_blocks = (
            kv_capacity_blocks(self.model, labelled, block_size, e.gpu_memory_utilization)
            if e.num_gpu_blocks is None
            else e.num_gpu_blocks
        )
        # The host tier holds a replica's blocks: every rank's KV heads (host_kv_gb is per replica).
        block_bytes = self.model.rank_kv_bytes_per_token() * self.model.tensor_parallel_size * block_size
        self.num_host_blocks = (
            int(e.host_kv_gb * 1e9 // block_bytes) if e.num_host_blocks is None else e.num_host_blocks
        )
        self.scheduler_config = scheduler_config(cfg, self.num_blocks, self.num_host_blocks)
        # The C++ core checks sizes and policy parameters now, on a one-block scheduler.
        cp.Scheduler(dataclasses.replace(self.scheduler_config, num_blocks=1, max_num_seqs=1))
        self.cost_model = make_cost_model(cfg.sim.cost_model, self.model, self.hardware, cfg.sim.profile_path)
        self.lookahead = None if cfg.sim.lookahead is None else LookaheadConfig.from_dict(cfg.sim.lookahead)
        if self.lookahead is not None and getattr(self.cost_model, "native", None) is None:
            raise ValueError("sim.lookahead runs candidates on the cost model's C++ evaluator: this one has none")
        self.workload = make_workload(cfg.workload.name, dict(cfg.workload.params))
        if cfg.sim.num_sessions is None and self.workload.endless and sessions is None:
            raise ValueError(
                f"sim.num_sessions: workload {cfg.workload.name!r} generates sessions without end; "
                f"say how many to run (null replays every session of a trace)"
            )
        self.capacity_tokens = self.num_blocks * block_size

    def run(self, env: simpy.Environment | None = None, replica_factory=None) -> SimResult:
        """Runs the workload to its end.

        Args:
            env: the clock (default: a new simpy.Environment); a simpy.rt.RealtimeEnvironment runs
                the sessions in real time.
            replica_factory: ``(env, index, scheduler_config, collector) -> Replica`` in place of
                the simulated replicas (e.g. one that runs its plans on an engine,
                experiments/engine_replica.py); they run step by step.
        """
        cfg, s = self.cfg, self.cfg.sim
        env = simpy.Environment() if env is None else env
        collector = Collector(
            cfg.cluster.num_replicas,
            self.num_blocks,
            s.kv_sample_interval_s,
            Slo(s.slo_ttft_s, s.slo_tpot_s),
            gpus_per_replica=self.model.tensor_parallel_size,
        )
        native = getattr(self.cost_model, "native", None)
        # the fast path (a look-ahead chooses between steps: the reference loop)
        driven = s.fast_forward and replica_factory is None and native is not None and self.lookahead is None
        if replica_factory is not None:
            replicas = [
                replica_factory(env, i, self.scheduler_config, collector) for i in range(cfg.cluster.num_replicas)
            ]
        else:
            replicas = [
                Replica(
                    env,
                    i,
                    self.scheduler_config,
                    self.cost_model,
                    collector,
                    s.idle_wait_s,
                    s.seed,
                    driven=driven,
                    lookahead=None if self.lookahead is None else Lookahead(self.lookahead, native.with_own_counts()),
                )
                for i in range(cfg.cluster.num_replicas)
            ]
        if native is not None:
            native.reset_counts()
        if driven:
            ClusterDriver(env, replicas, collector)
        router = Router(cfg.cluster.router, replicas)
        planned, notes = self._planned_sessions()
        sessions = _SessionRunner(
            self,
            env,
            router,
            collector,
            TokenFactory(s.seed, self.model.vocab_size),
            len(planned),
            _progress(len(planned), s.progress),
        )
        if s.mode == "open":
            for index, session in enumerate(planned):
                env.process(sessions.run(index, session, wait_for_start=True))
        else:
            source = enumerate(planned)

            def worker():
                for index, session in source:
                    yield from sessions.run(index, session, wait_for_start=False)

            for _ in range(s.concurrency):
                env.process(worker())
        done, progress = sessions.done, sessions.progress

        wall = time.perf_counter()
        until = done if s.max_sim_time_s is None else (done | env.timeout(s.max_sim_time_s))
        # The set-up's objects (modules, configs) stay out of the cyclic collector's passes during
        # the run: full collections would traverse them all again and again.
        gc.freeze()
        try:
            env.run(until=until)
        finally:
            gc.unfreeze()
        wall = time.perf_counter() - wall
        progress.close()
        for replica in replicas:
            replica.scheduler.check_invariants()
        summary = collector.summary([r.scheduler.stats() for r in replicas], wall)
        summary.update(self.describe())
        summary["num_sessions_planned"] = len(planned)
        controllers = [r.lookahead for r in replicas if getattr(r, "lookahead", None) is not None]
        if controllers:
            merged = merge_lookahead([c.summary() for c in controllers])
            shares = merged.pop("lookahead_share")
            summary.update(merged, **{f"lookahead_share_{i}": share for i, share in enumerate(shares)})
        notes += self._cost_notes(summary, native if replica_factory is None else None)
        if getattr(self.cost_model, "is_physical_limit", False):
            notes.append("roofline cost with zero step overhead: latencies are physical lower bounds")
        if (
            self.model.quantization == "fp8"
            and self.hardware.peak_flops_fp8 is None
            and getattr(self.cost_model, "name", "") == "roofline"
        ):
            notes.append(
                f"hardware {self.hardware_label} gives no peak_flops_fp8: the FP8 linear layers are "
                f"priced at peak_flops, the model dtype's rate"
            )
        summary["physical_limit"] = bool(getattr(self.cost_model, "is_physical_limit", False))
        summary["completed"] = sessions.finished == len(planned)
        return SimResult(cfg, summary, collector, self.num_blocks, notes, overload_warnings(summary, s.slo_ttft_s))

    def _planned_sessions(self) -> tuple[list[Session], list[str]]:
        """The sessions this run replays or generates, and a note when a trace is cut short."""
        s = self.cfg.sim
        if self.sessions is not None:
            return self.sessions, []
        if self.workload.endless:
            return self.workload.sessions(s.num_sessions, s.seed, s.session_rate), []
        everything = self.workload.sessions(None, s.seed, s.session_rate)
        planned = everything[: s.num_sessions]
        if len(planned) < len(everything):
            return planned, [
                (
                    f"replayed the first {len(planned)} of the trace's {len(everything)} sessions "
                    f"(sim.num_sessions={s.num_sessions}; null replays them all)"
                )
            ]
        return planned, []

    def _cost_notes(self, summary: dict, native) -> list[str]:
        """What the summary should say about how steps were priced: steps beyond a profile's range,
        a profile measured with another decode loop than this simulation plans for."""
        notes = []
        if native is not None:
            summary["cost_steps"] = int(native.num_steps)
            summary["cost_steps_extrapolated"] = int(native.num_extrapolated)
            if native.num_extrapolated:
                notes.append(
                    f"{native.num_extrapolated} of {native.num_steps} steps lie beyond the profiled range: "
                    f"priced by extending the fitted rates linearly"
                )
        meta = getattr(self.cost_model, "meta", {})
        overlap = meta.get("overlap")
        lookahead = self.cfg.scheduler.num_lookahead_tokens
        if overlap is not None and bool(overlap) != (lookahead > 0):
            notes.append(
                f"the profile was measured with overlapped decode {'on' if overlap else 'off'}, but "
                f"scheduler.num_lookahead_tokens={lookahead} plans as an engine "
                f"with it {'off' if overlap else 'on'}"
            )
        return notes

    def describe(self) -> dict:
        c = self.cfg
        return {
            "model": self.model.label,
            "hardware": self.hardware_label,
            "workload": c.workload.name,
            "policy": c.policy.name,
            "ordering": c.scheduler.ordering,
            "eviction": c.scheduler.eviction,
            "preemption": c.scheduler.preemption,
            "router": c.cluster.router,
            "tensor_parallel_size": self.model.tensor_parallel_size,
            "kv_blocks_per_replica": self.num_blocks,
            "host_blocks_per_replica": self.num_host_blocks,
            "cost_model": c.sim.cost_model,
            "mode": c.sim.mode,
            "seed": c.sim.seed,
        }


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _SessionRunner:
    """One simulation's agent sessions as SimPy processes: each turn's prompt built on the session's
    context, routed, submitted and waited for, then the pause before the next; the run ends (`done`) when
    every planned session has."""

    def __init__(
        self,
        sim: Simulation,
        env: simpy.Environment,
        router: Router,
        collector: Collector,
        tokens: TokenFactory,
        planned: int,
        progress,
    ) -> None:
        self.sim, self.env, self.router, self.collector, self.tokens = sim, env, router, collector, tokens
        self.planned, self.progress = planned, progress
        self.ids = itertools.count()
        self.seen_prefixes: set[tuple[int, int]] = set()
        self.done = env.event()
        self.finished = 0

    def run(self, index: int, session: Session, wait_for_start: bool):
        env, cfg, collector, tokens = self.env, self.sim.cfg, self.collector, self.tokens
        if wait_for_start and session.start_time > env.now:
            yield env.timeout(session.start_time - env.now)
        start = env.now
        rng = tokens.session_rng(index)
        context = SessionContext(tokens.prefix(session.prefix_id, session.prefix_tokens))
        used: set[Replica] = set()
        truncated, calls = False, 0
        last: tuple[Replica, int] | None = None  # the previous call: its replica and request id
        new_ids = tokens.session_new_tokens(rng, session.turns)
        for k, turn in enumerate(session.turns):
            new = new_ids[k]
            prompt = context.extend(new)
            max_new = min(turn.output_tokens, self.sim.scheduler_config.max_model_len - prompt.size)
            if max_new < 1 or prompt.size + max_new - 1 > self.sim.capacity_tokens:
                truncated = True  # the context outgrew the model length or the KV cache
                break
            genuinely_new = new.size
            key = (session.prefix_id, session.prefix_tokens)
            if k == 0 and session.prefix_id >= 0 and key not in self.seen_prefixes:
                self.seen_prefixes.add(key)
                genuinely_new += session.prefix_tokens
            replica = self.router.route(prompt, session.session_id, env.now)
            used.add(replica)
            request_id = next(self.ids)
            after = last[1] if last is not None and last[0] is replica else None
            finished = yield replica.submit(request_id, prompt, max_new, session.session_id, after, new)
            last = (replica, request_id)
            calls += 1
            collector.on_request(finished, session.session_id, k, replica.index, new.size, genuinely_new)
            context.extend(finished.output_token_array)
            if turn.pause_after > 0 and k + 1 < len(session.turns):
                yield env.timeout(turn.pause_after)
        if cfg.sim.end_sessions:
            for replica in used:
                replica.end_session(session.session_id)
        self.router.forget(session.session_id)
        collector.on_session(session.session_id, start, env.now, calls, truncated)
        self.finished += 1
        self.progress.update(1)
        if self.finished == self.planned and not self.done.triggered:
            self.done.succeed()


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="session", desc="simulating", mininterval=1.0)
