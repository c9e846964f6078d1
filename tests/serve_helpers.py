"""Drivers for the serving tests: a `python -m engine.serve` subprocess, its metrics and its memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 49152  # SmolLM2's

# KV blocks of the test servers: 1024 x 16 tokens holds 200 concurrent short requests with room to spare.
NUM_BLOCKS = 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python -m engine.serve` on a free loopback port; its output goes to `log_path`.

    Args:
        log_dir: where the log file and Hydra's run directory go.
        overrides: extra Hydra overrides (e.g. "api_key=secret").
    """

    def __init__(self, log_dir: str, overrides: tuple[str, ...] = (), name: str = "server") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"{name}.log")
        run_dir = os.path.join(log_dir, f"{name}-hydra")
        self.args = [
            sys.executable,
            "-m",
            "engine.serve",
            f"port={self.port}",
            f"hydra.run.dir={run_dir}",
            f"+engine.num_gpu_blocks={NUM_BLOCKS}",
            "+engine.device=cpu",
            *overrides,
        ]
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        env = dict(os.environ)
        # One intra-op thread: on a small shared machine, torch's spinning OpenMP workers fight the other
        # processes for the cores and a decode step gets ~8x slower (measured: 2 s vs 0.26 s at batch 1).
        env["OMP_NUM_THREADS"] = "1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Polls /health until it answers 200; fails with the server's log if the process dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return "(no log)"

    @contextlib.contextmanager
    def running(self):
        """Started and ready inside the block, stopped after it (also when the block fails)."""
        self.start()
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (the gateway and its children) if it has not exited within 15 s."""
        if self.proc is None:
            return
        family = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for p in family[1:]:  # the core (and multiprocessing's resource tracker) must not outlive the test
            try:
                p.kill()
            except psutil.Error:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def processes(self) -> list[psutil.Process]:
        """The gateway process and all its descendants (the engine core, multiprocessing's resource tracker)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def core_process(self) -> psutil.Process:
        """The spawned engine-core child (the one started by multiprocessing's spawn_main)."""
        cores = [p for p in self.processes()[1:] if "spawn_main" in " ".join(p.cmdline())]
        assert len(cores) == 1, f"expected one engine-core child, found {cores}"
        return cores[0]

    def rss_bytes(self) -> int:
        """Resident memory of the gateway plus the engine core."""
        return self.processes()[0].memory_info().rss + self.core_process().memory_info().rss


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}, comments dropped."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    r = httpx.get(url + "/metrics", headers=headers, timeout=30.0)
    r.raise_for_status()
    return parse_metrics(r.text)


def wait_idle(url: str, timeout_s: float = 30.0, headers: dict | None = None) -> dict[str, float]:
    """Polls /metrics until nothing runs, waits or holds KV blocks; returns the last sample either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url, headers)
        idle = (
            m["tandem_num_requests_running"] == 0
            and m["tandem_num_requests_waiting"] == 0
            and m["tandem_kv_cache_used_blocks"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


def is_openai_error(body) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    err = body["error"]
    return (
        set(err) >= {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
    )


# A tiny random-weight model whose tokens often decode to nothing --------------------------------
# Its vocabulary is Llama-3's (128256, larger than SmolLM2's 49152, which bench_serving assumed when
# GET /v1/models did not say: issue #14); its tokenizer knows only the first TINY_TOKENIZER_SIZE ids:
#   0-2     special tokens (<|endoftext|> is the EOS): "" with skip_special_tokens
#   3-258   one byte each (byte-level BPE): 0x80-0xff are parts of characters
#   259-    " w<i>", " w<i>" + the first 2 of a CJK character's 3 bytes (ends inside a character: its
#           text waits for the next token), a CJK character + digits
#   >= TINY_TOKENIZER_SIZE  unknown to the tokenizer: they decode to "" (as HF tokenizers do)
# so random weights generate a mix of tokens with text and tokens with none, every kind but the
# special ones (rare here; the gateway-level test in test_serve.py feeds them) in a few dozen tokens.

TINY_VOCAB = 128256
TINY_TOKENIZER_SIZE = 49152
TINY_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_BYTE0 = len(TINY_SPECIAL)  # the id of byte 0; byte b is TINY_BYTE0 + b
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in a BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = 256 + extra, extra + 1
    return [chr(table[b]) for b in range(256)]


def write_tiny_model(directory: str, vocab_size: int = TINY_VOCAB) -> str:
    """config.json of a 1-layer random-weight Llama (serve it with load_format=dummy) and the synthetic
    byte-level tokenizer described above (tokenizer.json, with a ChatML chat template), in `directory`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    chars = _byte_level_chars()

    def piece(data: bytes) -> str:
        return "".join(chars[b] for b in data)

    vocab = {s: i for i, s in enumerate(TINY_SPECIAL)}
    for b in range(256):
        vocab[piece(bytes([b]))] = len(vocab)
    i = 0
    while len(vocab) < TINY_TOKENIZER_SIZE:
        cjk = chr(0x4E00 + i % 20000).encode()
        word = [f" w{i}".encode(), f" w{i}".encode() + cjk[:2], cjk + str(i).encode()][i % 3]
        vocab.setdefault(piece(word), len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TINY_SPECIAL])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=TINY_SPECIAL[0], bos_token=TINY_SPECIAL[1], chat_template=_CHATML
    ).save_pretrained(directory)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 0,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def tiny_server(log_dir: str, model_dir: str | None = None, name: str = "tiny") -> ServerProcess:
    """A ServerProcess (not started) serving write_tiny_model's model and tokenizer (written into log_dir
    unless `model_dir` already holds them); `.model_dir` holds them."""
    model_dir = model_dir or write_tiny_model(os.path.join(log_dir, f"{name}-model"))
    server = ServerProcess(
        log_dir,
        overrides=(f"model={model_dir}", "+engine.load_format=dummy", f"+engine.tokenizer={model_dir}"),
        name=name,
    )
    server.model_dir = model_dir
    return server


def sse_events(url: str, path: str, body: dict, timeout: float = 120.0) -> list[dict]:
    """The JSON events of one streamed request ([DONE] dropped; it must end the stream)."""
    events = []
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# Load ------------------------------------------------------------------------------------------


async def stream_once(http: httpx.AsyncClient, url: str, i: int, max_tokens: int, cut_after: int | None):
    """One streaming request; returns ("cut", chunks) or ("done", finish_reason, saw [DONE]).

    A request cut after `cut_after` chunks asks for 1000 tokens: if the gateway did not abort it when its
    client went away, it would still be running when the test looks.
    """
    if i % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Say hello to user {i}."}]}
    else:
        path, body = "/v1/completions", {"prompt": f"Request {i}: 1, 2, 3,"}
    body.update(max_tokens=max_tokens, stream=True, temperature=0.7, seed=i)
    if cut_after is not None:  # long, so that only the abort on disconnect can free it in time
        body.update(max_tokens=1000, ignore_eos=True)
    finish, chunks = None, 0
    async with http.stream("POST", url + path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done", finish, True
            chunk = json.loads(line[6:])
            chunks += 1
            finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
            if cut_after is not None and chunks >= cut_after:
                return "cut", chunks  # leaving the block closes the connection mid-stream
    return "done", finish, False


def load_round(url: str, clients: int, max_tokens: int, seed: int, timeout_s: float = 300.0) -> list:
    """`clients` concurrent streams, a quarter of them (chosen by `seed`) cut after 1-3 chunks.

    Returns one `stream_once` result, or the exception it raised, per client.
    """
    rng = random.Random(seed)
    cut = set(rng.sample(range(clients), clients // 4))

    async def main():
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=60)) as http:
            jobs = [
                stream_once(http, url, i, max_tokens, rng.randint(1, 3) if i in cut else None) for i in range(clients)
            ]
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout_s)

    return asyncio.run(main())


# Fuzzing: request bodies -----------------------------------------------------------------------
# Bodies mix valid fields with junk (wrong types, huge or negative numbers, nested values, unicode).
# Integers beyond 64 bits are drawn too; lone surrogates (st.text never draws them) and non-string
# text parts have their own tests in test_serve.py.

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | _INT64
    | st.sampled_from([0, -1, 2**31, 2**62, -(2**63), 2**64, -(2**70)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e300, -1e300, 1e-300])
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_SHORT_TEXT = st.text(max_size=24)
_COMMON = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.sampled_from([-1, 0, 1, 5, 50]),
    "min_p": st.floats(0, 1),
    "seed": _INT64,
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "n": st.integers(1, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 3),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "session_id": _SHORT_TEXT,
    "cache_salt": _SHORT_TEXT,
    "priority": st.integers(-10, 10),
    "user": _SHORT_TEXT,
    "model": st.sampled_from([None, "default", "default", "gpt-4"]),
}
_COMPLETION = {
    "prompt": st.text(min_size=1, max_size=24)
    | st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=2)
    | st.lists(st.integers(-3, VOCAB + 3), min_size=1, max_size=12)
    | st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=2),
    "logprobs": st.integers(-1, 22),
    "echo": st.booleans(),
}
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": _SHORT_TEXT})
_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "wizard"]),
        "content": _SHORT_TEXT | st.none() | st.lists(_PART, max_size=2),
    },
    optional={"name": _SHORT_TEXT, "extra": _JUNK},
)
_CHAT = {
    "messages": st.lists(_MESSAGE, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 22),
    "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "tokenize", "foo"]), _JUNK, max_size=2),
}


@st.composite
def _bodies(draw, fields: dict, chat: bool):
    """A body with a few valid fields and a few junk ones; the length limit always stays small (1-3 tokens)."""
    body = {"stream": draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True)):
        body[name] = draw(_JUNK if draw(st.sampled_from([False] * 5 + [True])) else fields[name])
    required = "messages" if chat else "prompt"
    if required not in body and draw(st.sampled_from([True] * 5 + [False])):
        body[required] = draw(fields[required])
    limit = ["max_tokens", "max_completion_tokens"][draw(st.integers(0, 1))] if chat else "max_tokens"
    body[limit] = draw(st.integers(1, 3))
    other = "max_completion_tokens" if limit == "max_tokens" else "max_tokens"
    if chat and draw(st.booleans()):
        # junk in the other limit: a value it falls back to is still small or refused
        body[other] = draw(st.integers(-2, 3) | st.sampled_from([2**62, "x", [1], 1.5]))
    for key, value in draw(st.dictionaries(st.text(max_size=8), _JUNK, max_size=2)).items():
        body.setdefault(key, value)  # unknown fields are ignored
    return body


REQUESTS = _bodies({**_COMMON, **_COMPLETION}, chat=False).map(lambda b: ("/v1/completions", b)) | _bodies(
    {**_COMMON, **_CHAT}, chat=True
).map(lambda b: ("/v1/chat/completions", b))
