"""What the gateway <-> engine-core split costs: the IPC channel, and per request / per streamed token.

    python -m experiments.bench_ipc

1. channel: round trips of protocol messages between two processes over ZMQ ipc:// sockets
   (msgpack records), for an Add of a 50K-token prompt and a Tokens batch of 1 and 256 requests.
2. end to end: a tiny random-weight model (its step costs ~1 ms here) served by `engine.serve`
   in-process; one streaming client. Added latency per streamed token = the client's mean gap
   between tokens minus the engine's own mean decode step time (EngineCore, same model, same
   process, measured just after); added latency per request = TTFT minus the engine's prefill
   step. Both are upper bounds on the gateway + IPC cost (they include HTTP and SSE framing)
   and noisy on a shared machine (the engine's steps are timed in another run). The server's own
   `tandem_ipc_token_latency_seconds` histogram, read before and after the run, gives the IPC
   part exactly: core send -> gateway receive of each step's Tokens record, one clock.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import zmq

from engine.serve import protocol as P


def _echo(addr_in: str, addr_out: str) -> None:
    ctx = zmq.Context()
    recv, send = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    recv.connect(addr_in)
    send.connect(addr_out)
    while True:
        data = recv.recv()
        if data == b"stop":
            return
        msg = P.decode_to_core(data)
        if isinstance(msg, P.Add):
            n = len(P.unpack_ids(msg.prompt))
            send.send(P.encode(P.Tokens(list(range(min(n, 256))), [1] * min(n, 256))))
        else:
            send.send(P.encode(P.Tokens([], [])))


def channel_rows(repeats: int = 2000) -> list[tuple[str, float]]:
    d = tempfile.mkdtemp()
    a_in, a_out = f"ipc://{d}/in", f"ipc://{d}/out"
    ctx = zmq.Context()
    send, recv = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    send.bind(a_in)
    recv.bind(a_out)
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(a_in, a_out), daemon=True)
    proc.start()
    rows = []
    for name, msg in [
        ("Add, 20-token prompt -> Tokens b20", P.Add(1, P.pack_ids(range(20)), {"max_tokens": 16})),
        ("Add, 50K-token prompt -> Tokens b256", P.Add(1, P.pack_ids(range(50_000)), {"max_tokens": 16})),
        ("Abort -> empty Tokens", P.Abort([1, 2, 3])),
    ]:
        times = []
        for _ in range(repeats if "50K" not in name else repeats // 10):
            t = time.perf_counter()
            send.send(P.encode(msg))
            P.decode_from_core(recv.recv())
            times.append(time.perf_counter() - t)
        rows.append((name, statistics.median(times[10:]) * 1e6))
    send.send(b"stop")
    proc.join(5)
    return rows


def engine_step_times(options: dict, prompt_len: int, tokens: int) -> tuple[float, float]:
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore

    core = EngineCore(EngineConfig.from_dict(options))
    for _ in range(2):
        core.add_request(
            len(core.profile) + 1000,
            list(range(1, prompt_len + 1)),
            SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
        )
        core.profile.clear()
        while core.has_unfinished():
            core.step()
    prefill = core.profile[0]["seconds"]
    decode = statistics.mean(r["seconds"] for r in core.profile[1:])
    return prefill, decode


async def _stream_once(url: str, prompt_len: int, tokens: int) -> tuple[float, list[float]]:
    import httpx

    body = {
        "prompt": list(range(1, prompt_len + 1)),
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }  # a random model has no tokenizer: ids make the chunks
    async with httpx.AsyncClient(timeout=120) as client:
        start = time.perf_counter()
        stamps = []
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith('data: {"error"'):
                    raise RuntimeError(line)
                if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                    stamps.append(time.perf_counter())
        return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def end_to_end(options: dict, prompt_len: int = 64, tokens: int = 200) -> dict:
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "engine.serve", f"port={port}", "log_level=warning", f"model={options['model']}"] + [
        f"+engine.{k}={v}" for k, v in options.items() if k != "model"
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        asyncio.run(_stream_once(url, prompt_len, 8))  # warm-up
        before = _ipc_histogram(url)
        ttft, gaps = asyncio.run(_stream_once(url, prompt_len, tokens))
        after = _ipc_histogram(url)
    finally:
        proc.terminate()
        proc.wait(10)
    prefill, decode = engine_step_times(options, prompt_len, tokens)
    ipc = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return {
        "ttft": ttft,
        "itl": statistics.mean(gaps),
        "itl_p50": statistics.median(gaps),
        "engine_prefill": prefill,
        "engine_decode": decode,
        "ipc": ipc,
    }


def _ipc_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the gateway's tandem_ipc_token_latency_seconds histogram."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for key in ("tandem_ipc_token_latency_seconds_sum", "tandem_ipc_token_latency_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    return values.get("tandem_ipc_token_latency_seconds_sum", 0.0), values.get(
        "tandem_ipc_token_latency_seconds_count", 0.0
    )


def main() -> None:
    print("IPC channel (ZMQ ipc://, msgpack), median round trip between two processes")
    for name, us in channel_rows():
        print(f"  {name:<40} {us:8.1f} us")
    cfg_dir = tempfile.mkdtemp()
    from engine.models.shapes import SHAPES

    cfg = {
        **SHAPES["llama-3.2-1b"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path = os.path.join(cfg_dir, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    options = {"model": path, "load_format": "dummy", "device": "cpu", "num_gpu_blocks": 512}
    r = end_to_end(options)
    print("end to end, one streaming client, tiny random model on the CPU (ms)")
    print(
        f"  engine decode step {r['engine_decode'] * 1e3:.3f}   client inter-token gap mean {r['itl'] * 1e3:.3f} "
        f"(p50 {r['itl_p50'] * 1e3:.3f})   added per streamed token {(r['itl'] - r['engine_decode']) * 1e3:.3f}"
    )
    print(
        f"  engine prefill step {r['engine_prefill'] * 1e3:.3f}   client TTFT {r['ttft'] * 1e3:.3f}   "
        f"added per request {(r['ttft'] - r['engine_prefill']) * 1e3:.3f}"
    )
    print(f"  core -> gateway per step message (measured in the server, same run): {r['ipc'] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
