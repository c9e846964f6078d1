"""Workloads that break policies, found by search: Hypothesis over short agentic traces, run in the twin.

    python -m experiments.adversary                          # every built-in policy, every check
    python -m experiments.adversary policy=session_las       # one conf/policy entry
    python -m experiments.adversary scheduler.eviction=ttl:ttl=0.5 --checks preemption_storm more_kv
    python -m experiments.adversary --examples 400 --save tests/data/adversarial

What is searched: a scenario is a few sessions (1-6; a shared prefix of up to 1,024 tokens or none,
1-4 calls of 1-512 new and 1-256 output tokens, pauses of 0-0.1 s, starts within 0.1 s: a call's
work is milliseconds on this model, so sessions must overlap to contend) and the replica's sizes
(KV blocks from just enough for the longest session to enough for all at once, 1-8 running requests, prefill
chunks of 16-2,048 tokens, a host tier of 0-512 blocks). The model is a tiny
Llama shape (TINY_MODEL) on conf/hardware/cpu's roofline, so that every finding also runs through
the engine on a CPU, step for step (tests/test_adversarial.py).

The checks (each a property every policy should keep; a scenario that breaks one is a finding):
  preemption_storm   no request is preempted `--storm` (4) times or more
  livelock           every session finishes within `--horizon-s` (120) simulated seconds
  starvation         no request waits `--starve-s` (2) seconds for its first token (the whole work of a
                     scenario is well under a second on this model)
  slo_collapse       SLO attainment (TTFT <= 0.25 s, TPOT <= 10 ms) at most 0.5 under fcfs + lru's
                     on the same scenario
  more_kv            (metamorphic) twice the KV blocks never make the p99 session time more than
                     `--margin` (10%) + 1 ms longer
  remove_session     (metamorphic) removing one session never makes another call finish more than
                     `--margin` (10%) + 1 ms later

Hypothesis steers generation toward each check's measure (hypothesis.target) and shrinks each
finding to a small scenario (fewer sessions, calls and tokens, smaller sizes; for at most
--shrink-s seconds). With --save DIR each is written as DIR/<policy>__<check>.json: the scenario
as trace lines (docs/workloads.md), the sizes, the policy, what was measured, and the twin's
decisions (the number of steps and a digest of every plan), which tests/test_adversarial.py
replays in the twin and through the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sim.specs import CONF_DIR
from sim.workloads import Session, Turn

TINY_MODEL = {
    "name": "tiny",
    "num_layers": 2,
    "hidden_size": 128,
    "num_heads": 8,
    "num_kv_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "vocab_size": 512,
    "dtype_bytes": 4,
}
HARDWARE = "cpu"


def write_tiny_model(directory) -> tuple[str, str]:
    """TINY_MODEL in `directory` for both planes: (its config.json, for the engine with load_format=dummy; its
    conf/model-style .yaml, for the simulator and EngineConfig.step_cost)."""
    from engine.config import ModelConfig

    m = TINY_MODEL
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": m["vocab_size"],
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["intermediate_size"],
        "num_hidden_layers": m["num_layers"],
        "num_attention_heads": m["num_heads"],
        "num_key_value_heads": m["num_kv_heads"],
        "head_dim": m["head_dim"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": MAX_MODEL_LEN,
        "tie_word_embeddings": False,
        "eos_token_id": 1,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(ModelConfig.from_hf(hf).to_hf()))
    (directory / "tiny.yaml").write_text(yaml.safe_dump(m))
    return str(directory / "config.json"), str(directory / "tiny.yaml")


BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096
BASELINE = {"ordering": "fcfs", "eviction": "lru", "preemption": "recompute", "admission": "all"}
KINDS = tuple(BASELINE)
# the built-in policies, each beside the baseline's other kinds
BUILT_IN = {
    "fcfs": {},
    "priority": {"ordering": "priority"},
    "longest_prefix_match": {"ordering": "longest_prefix_match"},
    "session_las": {"ordering": "session_las"},
    "cache_credit": {"ordering": "cache_credit"},
    "ttl": {"eviction": "ttl:ttl=5"},
    "pause_aware": {"eviction": "pause_aware"},
    "priority_eviction": {"eviction": "priority"},
    "swap": {"preemption": "swap"},
    # a floor this tiny model's steps meet only when prefill chunks are cut (a decode step is ~0.3 ms)
    "tps_floor": {"admission": "tps_floor:tok_s=1500,min_chunk=16"},
}
CHECKS = ("preemption_storm", "livelock", "starvation", "slo_collapse", "more_kv", "remove_session")
SLO_TTFT_S, SLO_TPOT_S = 0.25, 0.010


@dataclass(frozen=True)
class Scenario:
    """What the search draws: sessions and the replica's sizes (and, for remove_session, which one goes)."""

    sessions: tuple[Session, ...]
    num_blocks: int
    max_num_seqs: int
    chunk_size: int
    max_num_batched_tokens: int
    num_host_blocks: int
    removed: int = 0

    def scheduler(self, policy: dict) -> dict:
        return {
            **BASELINE,
            **policy,
            "block_size": BLOCK_SIZE,
            "max_num_seqs": self.max_num_seqs,
            "chunk_size": self.chunk_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": MAX_MODEL_LEN,
        }

    def trace(self) -> list[dict]:
        """The sessions as trace lines (docs/workloads.md, `trace`)."""
        lines = []
        for s in self.sessions:
            for k, t in enumerate(s.turns):
                line = {"session_id": s.session_id, "prompt_tokens": t.new_tokens, "output_tokens": t.output_tokens}
                if k == 0:
                    line["arrival_time"] = s.start_time
                    if s.prefix_id >= 0:
                        line.update(prefix_id=s.prefix_id, prefix_tokens=s.prefix_tokens)
                if k < len(s.turns) - 1:
                    line["pause_after"] = t.pause_after
                lines.append(line)
        return lines

    def to_json(self) -> dict:
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sessions"}
        return {"trace": self.trace(), **sizes}

    @classmethod
    def from_json(cls, d: dict) -> "Scenario":
        sessions: dict[str, dict] = {}
        for line in d["trace"]:
            s = sessions.setdefault(
                line["session_id"],
                {"start": line.get("arrival_time", 0.0), "pid": line.get("prefix_id", -1), "pt": 0, "turns": []},
            )
            s["pt"] = line.get("prefix_tokens", s["pt"])
            s["turns"].append(Turn(line["prompt_tokens"], line["output_tokens"], line.get("pause_after", 0.0)))
        built = tuple(Session(sid, s["start"], s["pid"], s["pt"], tuple(s["turns"])) for sid, s in sessions.items())
        return cls(built, **{k: v for k, v in d.items() if k != "trace"})


def scenarios():
    """The Hypothesis strategy of scenarios (imported lazily: only the search needs Hypothesis)."""
    from hypothesis import strategies as st

    @st.composite
    def draw_scenario(draw) -> Scenario:
        prefix_tokens = {0: draw(st.integers(1, 1024)), 1: draw(st.integers(1, 1024))}
        sessions = []
        for i in range(draw(st.integers(1, 6))):
            pid = draw(st.sampled_from([-1, 0, 1]))
            calls = draw(
                st.lists(
                    st.tuples(st.integers(1, 512), st.integers(1, 256), st.integers(0, 20)), min_size=1, max_size=4
                )
            )
            turns = tuple(
                Turn(new, out, pause / 200 if k < len(calls) - 1 else 0.0) for k, (new, out, pause) in enumerate(calls)
            )
            start = draw(st.integers(0, 20)) / 200
            sessions.append(Session(f"s{i}", start, pid, prefix_tokens[pid] if pid >= 0 else 0, turns))
        needs = [
            math.ceil((s.prefix_tokens + sum(t.new_tokens + t.output_tokens for t in s.turns)) / BLOCK_SIZE) + 1
            for s in sessions
        ]
        chunk = draw(st.sampled_from([2048, 512, 128, 16]))
        return Scenario(
            tuple(sessions),
            num_blocks=max(needs) + draw(st.integers(0, sum(needs) - max(needs))),
            max_num_seqs=draw(st.integers(1, 8)),
            chunk_size=chunk,
            max_num_batched_tokens=max(chunk, draw(st.sampled_from([8192, 2048, 512]))),
            num_host_blocks=draw(st.sampled_from([0, 64, 512])),
            removed=draw(st.integers(0, len(sessions) - 1)),
        )

    return draw_scenario()


# --------------------------------------------------------------------------- the twin


@dataclass
class TwinRun:
    summary: dict
    requests: list[tuple]  # sim/metrics.py REQUEST_COLUMNS rows
    keys: list[tuple] | None = None  # every plan's key (experiments.engine_replica.plan_key), if recorded


def sim_config(scenario: Scenario, policy: dict, num_blocks: int | None = None, horizon_s: float = 120.0) -> dict:
    """The simulator's configuration of a scenario: its replica, the tiny model, one session per its start."""
    return {
        "model": dict(TINY_MODEL),
        "hardware": dataclasses.asdict(_hardware()),
        "scheduler": scenario.scheduler(policy),
        "engine": {"num_gpu_blocks": num_blocks or scenario.num_blocks, "num_host_blocks": scenario.num_host_blocks},
        "sim": {
            "mode": "open",
            "num_sessions": None,
            "seed": 0,
            "progress": False,
            "max_sim_time_s": horizon_s,
            "slo_ttft_s": SLO_TTFT_S,
            "slo_tpot_s": SLO_TPOT_S,
            "kv_sample_interval_s": 1.0,
        },
        "wandb": {"mode": "disabled"},
    }


@functools.lru_cache(maxsize=1)
def _hardware():
    from sim.specs import load_hardware_spec

    return load_hardware_spec(HARDWARE)


def run_twin(
    scenario: Scenario,
    policy: dict,
    num_blocks: int | None = None,
    sessions: tuple[Session, ...] | None = None,
    record: bool = False,
    horizon_s: float = 120.0,
) -> TwinRun:
    """The scenario in the simulator (`record`: step by step, each plan's key kept)."""
    from experiments.engine_replica import StepLog, recording_replicas
    from sim.simulation import Simulation

    cfg = sim_config(scenario, policy, num_blocks, horizon_s)
    sim = Simulation(cfg, sessions=list(scenario.sessions if sessions is None else sessions))
    log = StepLog() if record else None
    factory = recording_replicas(sim.cost_model, sim.cfg.sim.idle_wait_s, sim.cfg.sim.seed, log) if record else None
    result = sim.run(replica_factory=factory)
    return TwinRun(result.summary, list(result.collector.requests), None if log is None else log.keys)


def decisions_digest(keys: list[tuple]) -> str:
    """A digest of every plan's decisions (times rounded to the nanosecond: the same floats on any machine)."""
    h = hashlib.sha256()
    for key in keys:
        h.update(repr((round(key[0], 9),) + tuple(key[1:])).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Limits:
    storm: int = 4
    horizon_s: float = 120.0
    starve_s: float = 2.0
    margin: float = 0.10


def _col(run: TwinRun, name: str) -> list:
    from sim.metrics import REQUEST_COLUMNS

    i = REQUEST_COLUMNS.index(name)
    return [row[i] for row in run.requests]


def _p99_session_s(run: TwinRun) -> float:
    ends: dict[str, float] = {}
    starts: dict[str, float] = {}
    for sid, arrival, finish in zip(_col(run, "session_id"), _col(run, "arrival"), _col(run, "finish")):
        starts[sid] = min(starts.get(sid, arrival), arrival)
        ends[sid] = max(ends.get(sid, finish), finish)
    spans = sorted(ends[s] - starts[s] for s in ends)
    return float(_percentile(spans, 99))


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


def check(name: str, scenario: Scenario, policy: dict, limits: Limits, steer: bool = False) -> dict | None:
    """What breaks `name`'s property on this scenario (a dict of the measured figures), or None.

    `steer` (inside a Hypothesis search only): report how close the scenario came (hypothesis.target),
    so that generation climbs toward a finding rather than waiting to stumble on one."""
    run = run_twin(scenario, policy, horizon_s=limits.horizon_s)
    s = run.summary
    aim = _target if steer else (lambda value, label: None)
    if name == "livelock":
        if not s["completed"]:
            return {"finished_requests": s["num_requests"], "horizon_s": limits.horizon_s}
        return None
    if not s["completed"]:
        return None  # a livelock is livelock's finding
    if name == "preemption_storm":
        worst = max(_col(run, "preemptions"), default=0)
        aim(float(worst), "max preemptions of a request")
        return {"max_preemptions_of_a_request": int(worst)} if worst >= limits.storm else None
    if name == "starvation":
        worst = max(_col(run, "ttft"), default=0.0)
        aim(float(worst), "max TTFT s")
        return {"max_ttft_s": worst} if worst >= limits.starve_s else None
    if name == "slo_collapse":
        base = run_twin(scenario, {}, horizon_s=limits.horizon_s).summary
        aim(float(base["slo_attainment"] - s["slo_attainment"]), "SLO attainment below the baseline's")
        if base.get("completed") and s["slo_attainment"] < base["slo_attainment"] - 0.5:
            return {"slo_attainment": s["slo_attainment"], "baseline_slo_attainment": base["slo_attainment"]}
        return None
    if name == "more_kv":
        more = run_twin(scenario, policy, num_blocks=2 * scenario.num_blocks, horizon_s=limits.horizon_s)
        if not more.summary["completed"]:
            return {"p99_session_s": _p99_session_s(run), "p99_session_s_2x_kv": math.inf}
        a, b = _p99_session_s(run), _p99_session_s(more)
        aim(b - a, "p99 session s lost to more KV")
        return {"p99_session_s": a, "p99_session_s_2x_kv": b} if b > a * (1 + limits.margin) + 1e-3 else None
    if name == "remove_session":
        if len(scenario.sessions) < 2:
            return None
        gone = scenario.sessions[scenario.removed].session_id
        rest = tuple(x for x in scenario.sessions if x.session_id != gone)
        without = run_twin(scenario, policy, sessions=rest, horizon_s=limits.horizon_s)
        if not without.summary["completed"]:
            return {"removed": gone, "delay_s": math.inf}
        before = {(sid, t): f for sid, t, f in zip(_col(run, "session_id"), _col(run, "turn"), _col(run, "finish"))}
        worst, call, closest = 0.0, None, -math.inf
        for sid, t, f in zip(_col(without, "session_id"), _col(without, "turn"), _col(without, "finish")):
            old = before[(sid, t)]
            delay = f - old
            closest = max(closest, delay - limits.margin * old)
            if delay > limits.margin * old + 1e-3 and delay > worst:
                worst, call = delay, f"{sid} call {t}"
        aim(closest, "delay of a call by a removed session")
        return {"removed": gone, "delayed_call": call, "delay_s": worst} if call else None
    raise ValueError(f"unknown check {name!r}; checks: {list(CHECKS)}")


def _target(value: float, label: str) -> None:
    from hypothesis import target

    if math.isfinite(value):
        target(value, label=label)


def search(
    name: str, policy: dict, limits: Limits, examples: int, seed: int, shrink_s: float = 30.0
) -> tuple[Scenario, dict] | None:
    """Hypothesis's smallest scenario that breaks `name` under `policy` in `examples` tries, or None.

    Shrinking stops `shrink_s` seconds after the first finding: from then on only scenarios already known
    to break the property count as breaking it (so the search ends with the smallest found by then, and
    Hypothesis's own replay of it agrees)."""
    from hypothesis import HealthCheck, find, settings
    from hypothesis.errors import NoSuchExample

    cfg = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    breaking: set[Scenario] = set()
    first: list[float] = []

    def breaks(sc: Scenario) -> bool:
        if first and time.perf_counter() - first[0] > shrink_s:
            return sc in breaking
        if check(name, sc, policy, limits, steer=True) is None:
            return False
        breaking.add(sc)
        first[:] = first or [time.perf_counter()]
        return True

    try:
        found = find(scenarios(), breaks, settings=cfg, random=random.Random(seed))
    except NoSuchExample:
        return None
    return found, check(name, found, policy, limits)


# --------------------------------------------------------------------------- the app


def policy_of(args: list[str]) -> dict[str, dict]:
    """The policies to search: `policy=NAME` (conf/policy) and `scheduler.KIND=SPEC`, or every built-in one."""
    if not args:
        return dict(BUILT_IN)
    policy: dict = {}
    label = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are policy=NAME or scheduler.KIND=SPEC, got {arg!r}")
        if key == "policy":
            path = CONF_DIR / "policy" / f"{value}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in (CONF_DIR / "policy").glob("*.yaml"))
                raise SystemExit(f"unknown policy {value!r}; conf/policy has {known}")
            section = yaml.safe_load(path.read_text())["scheduler"]
            policy.update({k: v for k, v in section.items() if k in KINDS})
            label.append(value)
        elif key.startswith("scheduler.") and key.split(".", 1)[1] in KINDS:
            policy[key.split(".", 1)[1]] = value
            label.append(value.split(":")[0])
        else:
            raise SystemExit(f"unknown key {key!r}: policy, or scheduler.{{{','.join(KINDS)}}}")
    from controlplane.config import SchedulerConfig

    SchedulerConfig(**{**BASELINE, **policy}).validate()
    return {"+".join(label): policy}


def save(directory: Path, label: str, name: str, policy: dict, scenario: Scenario, found: dict) -> Path:
    """The finding as DIR/<label>__<check>.json, with the twin's decisions (steps and digest)."""
    run = run_twin(scenario, policy, record=True)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{label}__{name}.json"
    record = {
        "policy": label,
        "check": name,
        "scheduler": {**BASELINE, **policy},
        "scenario": scenario.to_json(),
        "found": found,
        "twin": {"steps": len(run.keys), "digest": decisions_digest(run.keys), "completed": run.summary["completed"]},
    }
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policy", nargs="*", help="policy=NAME (conf/policy) and/or scheduler.KIND=SPEC; none: built-ins")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    p.add_argument("--examples", type=int, default=150, help="scenarios tried per policy and check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storm", type=int, default=Limits.storm)
    p.add_argument("--horizon-s", type=float, default=Limits.horizon_s)
    p.add_argument("--starve-s", type=float, default=Limits.starve_s)
    p.add_argument("--margin", type=float, default=Limits.margin)
    p.add_argument("--shrink-s", type=float, default=30.0, help="seconds of shrinking a finding gets")
    p.add_argument("--save", help="write each finding here (tests/data/adversarial replays them)")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    limits = Limits(args.storm, args.horizon_s, args.starve_s, args.margin)
    policies = policy_of(args.policy)
    print(f"{len(policies)} policies x {len(args.checks)} checks, {args.examples} scenarios each (seed {args.seed})")
    rows = []
    for label, policy in policies.items():
        for name in args.checks:
            t0 = time.perf_counter()
            result = search(name, policy, limits, args.examples, args.seed, args.shrink_s)
            row = {"policy": label, "check": name, "wall_s": round(time.perf_counter() - t0, 1)}
            if result is None:
                row["finding"] = None
                print(f"{label:<22} {name:<17} none in {args.examples} scenarios ({row['wall_s']} s)", flush=True)
            else:
                scenario, found = result
                calls = sum(len(s.turns) for s in scenario.sessions)
                row.update(finding=found, sessions=len(scenario.sessions), calls=calls)
                if args.save:
                    row["file"] = str(save(Path(args.save), label, name, policy, scenario, found))
                shown = ", ".join(f"{k}={_fmt(v)}" for k, v in found.items())
                print(
                    f"{label:<22} {name:<17} FOUND: {len(scenario.sessions)} sessions, {calls} calls, "
                    f"{scenario.num_blocks} blocks: {shown} ({row['wall_s']} s)",
                    flush=True,
                )
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
