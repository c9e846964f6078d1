"""Data-parallel serving on CPU with a tiny random model: throughput of N=2 beside N=1, and the prefix hit
rate of prefix_aware vs round_robin on an agentic trace through the real gateway beside the twin's.

    python -m experiments.bench_dp                       # under a minute on 2 CPU cores
    python -m experiments.bench_dp --requests 48 --sessions 12

`TwinCluster` is sim/cluster.py's `Replica`s and `Router` on a SimPy clock with a constant step cost.
Given the same calls in the same order (each waited for, or left in flight) it makes the routing decisions
the gateway makes (tests/test_serve_dp.py holds them equal) and predicts the prefix hits. The agentic
trace is `agentic_coding` scaled to the tiny model (prefixes of 200-600 tokens, ~6 calls a session), its
sessions' calls interleaved and sent one at a time, so that the loads the routers see are the twin's; each
call's prompt is the previous prompt + synthetic output ids + the turn's new ids (the server's own output
is not fed back, so the twin, whose outputs are synthetic too, holds the same prompt blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

import controlplane as cp


class _ConstantCost:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, plan) -> float:
        return self.seconds


class _NoMetrics:
    sample_interval_s = float("inf")

    def on_steps(self, run) -> None:
        pass


class TwinCluster:
    """`num_replicas` simulated replicas of `config` behind the router `router` (a spec).

    Args:
        num_replicas: replicas (the gateway's data_parallel_size).
        router: a router policy spec, as `cluster.router`.
        config: the cores' scheduler config (their num_blocks, block_size, vocab_size, max_model_len).
        step_s: simulated seconds per step (the order of events, not their times, decides routing here).
    """

    def __init__(self, num_replicas: int, router: str, config: cp.SchedulerConfig, step_s: float = 1e-3) -> None:
        import simpy

        from sim.cluster import Replica, Router

        self.env = simpy.Environment()
        cost, metrics = _ConstantCost(step_s), _NoMetrics()
        self.replicas = [
            Replica(self.env, i, config, cost, metrics, idle_wait_s=step_s, seed=0) for i in range(num_replicas)
        ]
        self.router = Router(router, self.replicas)
        self._ids = itertools.count(1)
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def call(self, prompt, max_tokens: int, session_id: str | None = None, wait: bool = True):
        """Routes and submits one call now; runs the cluster until it finishes unless `wait` is False.
        Returns the replica index it went to and its FinishedRequest (None when not waited for)."""
        ids = np.asarray(prompt, dtype=np.int32)
        replica = self.router.route(ids, session_id or "", self.env.now)
        done = replica.submit(next(self._ids), ids, max_tokens, session_id or "")
        if wait:
            self.env.run(until=done)
            self.prompt_tokens += done.value.num_prompt_tokens
            self.cached_tokens += done.value.num_cached_tokens
            return replica.index, done.value
        return replica.index, None

    def end_session(self, session_id: str) -> None:
        self.router.forget(session_id)
        for r in self.replicas:
            r.end_session(session_id)

    @property
    def hit_rate(self) -> float:
        """Cached over prompt tokens of the calls waited for."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# The real gateway -----------------------------------------------------------------------------------

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 0,
}
NUM_BLOCKS = 1024
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048


class Server:
    """`python -m engine.serve` of the TINY shape (random weights, no tokenizer) on CPU, in a subprocess."""

    def __init__(self, workdir: str, size: int, router: str) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        model = os.path.join(workdir, "tiny")
        os.makedirs(model, exist_ok=True)
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(TINY, f)
        self.args = [
            sys.executable,
            "-m",
            "engine.serve",
            f"model={model}",
            f"port={self.port}",
            f"data_parallel_size={size}",
            f"cluster.router={router}",
            "log_level=warning",
            f"hydra.run.dir={os.path.join(workdir, f'hydra-{size}-{router}')}",
            "engine.load_format=dummy",
            "engine.device=cpu",
            f"engine.num_gpu_blocks={NUM_BLOCKS}",
            f"scheduler.max_model_len={MAX_MODEL_LEN}",
        ]
        self.log = os.path.join(workdir, f"server-{size}-{router}.log")

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one intra-op thread per process: cores do not fight
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not start; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def throughput(url: str, requests: int, concurrency: int, prompt_tokens: int, output_tokens: int) -> dict:
    """Closed loop: `concurrency` clients, `requests` calls of random prompts; generated tokens per second."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, TINY["vocab_size"], size=prompt_tokens).tolist() for _ in range(requests)]
    todo = iter(prompts)

    async def client(http):
        done = 0
        for prompt in todo:
            r = await http.post(
                url + "/v1/completions", json={"prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True}
            )
            r.raise_for_status()
            done += r.json()["usage"]["completion_tokens"]
        return done

    async def run():
        async with httpx.AsyncClient(timeout=600) as http:
            await http.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4})  # warm up
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(client(http) for _ in range(concurrency))))
            return tokens, time.perf_counter() - start

    tokens, seconds = asyncio.run(run())
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "req_s": requests / seconds}


# The agentic trace ------------------------------------------------------------------------------------

AGENTIC = {
    "num_prefixes": 3,
    "prefix_tokens_min": 200,
    "prefix_tokens_max": 600,
    "new_tokens_mean": 40.0,
    "new_tokens_max": 256,
    "output_mean": 12.0,
    "output_max": 48,
    "calls_mean": 6.0,
    "calls_max": 12,
    "context_max": MAX_MODEL_LEN - 64,
}


def agentic_trace(num_sessions: int, seed: int = 0) -> list[tuple]:
    """("call", session, prompt, max_tokens) and ("end", session) ops: sessions' turns interleaved."""
    from sim.simulation import TokenFactory
    from sim.workloads import make_workload

    sessions = make_workload("agentic_coding", AGENTIC).sessions(num_sessions, seed)
    tokens = TokenFactory(seed, TINY["vocab_size"])
    calls = []
    for i, s in enumerate(sessions):
        rng, out_rng = tokens.session_rng(i), np.random.default_rng([seed, 0x0A7, i])
        context, mine = tokens.prefix(s.prefix_id, s.prefix_tokens).tolist(), []
        for turn in s.turns:
            context = context + tokens.new_tokens(rng, turn).tolist()
            if len(context) + turn.output_tokens > MAX_MODEL_LEN:
                break
            mine.append(("call", s.session_id, context, turn.output_tokens))
            context = context + out_rng.integers(3, TINY["vocab_size"], size=turn.output_tokens).tolist()
        mine.append(("end", s.session_id))
        calls.append(mine)
    ops = []
    for k in range(max(len(c) for c in calls)):
        ops += [c[k] for c in calls if k < len(c)]
    return ops


def replay_gateway(url: str, ops) -> tuple[float, list[int]]:
    """Sends the ops one at a time; the prefix hit rate the server reports and the replicas chosen."""
    prompt = cached = 0
    chosen = []
    with httpx.Client(timeout=600) as http:
        for op in ops:
            if op[0] == "end":
                http.post(f"{url}/v1/sessions/{op[1]}/end")
                continue
            r = http.post(
                url + "/v1/completions",
                json={"prompt": op[2], "max_tokens": op[3], "ignore_eos": True, "session_id": op[1]},
            )
            r.raise_for_status()
            usage = r.json()["usage"]
            prompt += usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            chosen.append(int(r.headers["x-tandem-replica"]))
    return cached / prompt, chosen


def replay_twin(size: int, router: str, ops) -> tuple[float, list[int]]:
    config = cp.SchedulerConfig(
        num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, vocab_size=TINY["vocab_size"], max_model_len=MAX_MODEL_LEN
    )
    twin, chosen = TwinCluster(size, router, config), []
    for op in ops:
        if op[0] == "end":
            twin.end_session(op[1])
        else:
            chosen.append(twin.call(op[2], op[3], op[1])[0])
    return twin.hit_rate, chosen


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=192, help="calls of the throughput run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=24, help="sessions of the agentic trace")
    ap.add_argument("--replicas", type=int, default=2, help="data_parallel_size of the compared runs")
    args = ap.parse_args(argv)
    out: dict = {"throughput": {}, "hit_rate": {}}
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as work:
        for size in (1, args.replicas):
            with Server(work, size, "least_loaded") as server:
                out["throughput"][size] = throughput(
                    server.url, args.requests, args.concurrency, args.prompt_tokens, args.output_tokens
                )
        ops = agentic_trace(args.sessions)
        for router in ("round_robin", "prefix_aware"):
            with Server(work, args.replicas, router) as server:
                real, real_chosen = replay_gateway(server.url, ops)
            twin, twin_chosen = replay_twin(args.replicas, router, ops)
            out["hit_rate"][router] = {
                "gateway": real,
                "twin": twin,
                "same_routes": real_chosen == twin_chosen,
                "calls": len(real_chosen),
            }
    t = out["throughput"]
    print(
        f"throughput (closed loop, {args.concurrency} clients, {args.requests} calls of {args.prompt_tokens}+"
        f"{args.output_tokens} tokens, least_loaded; CPU, {os.cpu_count()} cores)"
    )
    print(f"{'cores':>6} {'tok/s':>9} {'req/s':>7} {'seconds':>8}")
    for size, row in t.items():
        print(f"{size:>6} {row['tok_s']:>9.1f} {row['req_s']:>7.2f} {row['seconds']:>8.1f}")
    print(
        f"\nprefix hit rate, agentic trace ({args.sessions} sessions, calls one at a time), "
        f"data_parallel_size={args.replicas}"
    )
    print(f"{'router':>14} {'gateway':>8} {'twin':>8} {'same routes':>12} {'calls':>6}")
    for router, row in out["hit_rate"].items():
        print(f"{router:>14} {row['gateway']:>8.3f} {row['twin']:>8.3f} {row['same_routes']!s:>12} {row['calls']:>6}")
    return out


if __name__ == "__main__":
    main()
