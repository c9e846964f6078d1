"""KV cache events: what enters and leaves the prefix cache, published over ZMQ in vLLM's format.

KV-aware routers (llm-d's precise prefix-cache scorer, NVIDIA Dynamo's KV router, ...) subscribe
to each engine's stream and keep a map of which engine caches which blocks. The control plane
records the events (csrc/block_pool.h `KvEventLog`, off unless asked); the engine drains them
after every step and hands them to a `KVEventPublisher`, whose thread encodes and sends them, so
the step loop never waits on a socket. Format, options and a consumer: docs/kv-events.md.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from controlplane.config import reject_unknown_keys

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)  # the replay's last frame: [END_OF_REPLAY, b""]


@dataclass(frozen=True)
class KVEventsConfig:
    """Where and how an engine publishes its KV cache events; vLLM's `--kv-events-config` field names.

    Attributes:
        enable_kv_cache_events: record and publish events at all.
        publisher: "zmq" or "null" (record nothing); None: "zmq" when enabled, else "null".
        endpoint: the PUB socket's address; bound when it has a wildcard ("*", "::") or is ipc:// or
            inproc://, else connected (to a consumer that binds).
        replay_endpoint: a ROUTER address (always bound) that resends buffered batches on request.
        buffer_steps: batches kept for replay (one batch per engine step that changed the cache).
        hwm: the PUB socket's high-water mark (ZMQ drops messages to a subscriber past it).
        max_queue_size: batches waiting for the publisher thread; past it, batches are dropped
            (the step loop never waits) and the drop shows as a gap in the sequence numbers.
        topic: the first frame of every message (llm-d expects "kv@<pod>@<model>").
        data_parallel_rank: written in every batch (a Tandem engine is one rank: 0).
        wire_format: "array" (events as tagged positional arrays: the format vLLM published first
            and every consumer decodes) or "map" (events as maps tagged by "type", as newer vLLM).
    """

    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""
    data_parallel_rank: int = 0
    wire_format: str = "array"

    def for_rank(self, rank: int) -> KVEventsConfig:
        """The config of data-parallel core `rank`: its rank in every batch, and endpoints of its own (a TCP
        port plus `rank`, as vLLM offsets them; an ipc/inproc path with "-dp<rank>" appended)."""

        def own(endpoint: str | None) -> str | None:
            if endpoint is None or rank == 0:
                return endpoint
            if endpoint.startswith(("ipc://", "inproc://")):
                return f"{endpoint}-dp{rank}"
            head, sep, port = endpoint.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"kv_events endpoint {endpoint!r}: data-parallel cores need a TCP port to offset")
            return f"{head}:{int(port) + rank}"

        return dataclasses.replace(
            self, data_parallel_rank=rank, endpoint=own(self.endpoint), replay_endpoint=own(self.replay_endpoint)
        )

    @classmethod
    def from_value(cls, value: KVEventsConfig | Mapping[str, Any] | None) -> KVEventsConfig | None:
        """The config of an EngineConfig's `kv_events` (a mapping, e.g. from YAML, or a KVEventsConfig)."""
        if value is None or isinstance(value, KVEventsConfig):
            return value
        reject_unknown_keys(cls, value, "kv_events config")
        return cls(**dict(value))

    def __post_init__(self) -> None:
        if self.publisher not in (None, "zmq", "null"):
            raise ValueError(f"kv_events.publisher must be zmq or null, got {self.publisher!r}")
        if self.wire_format not in ("array", "map"):
            raise ValueError(f"kv_events.wire_format must be array or map, got {self.wire_format!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv_events.{name} must be positive, got {getattr(self, name)}")

    @property
    def publishes(self) -> bool:
        """Whether an engine with this config records and publishes events."""
        kind = self.publisher or ("zmq" if self.enable_kv_cache_events else "null")
        return self.enable_kv_cache_events and kind == "zmq"


def _event_types(array_like: bool) -> tuple[type, type, type]:
    """BlockStored, BlockRemoved, AllBlocksCleared as msgspec structs tagged by class name.

    Every field is required, so each is always written, in vLLM's field order."""
    options = {"tag": True, "array_like": array_like, "omit_defaults": True, "gc": False}
    stored = msgspec.defstruct(
        "BlockStored",
        [
            ("block_hashes", list[int]),
            ("parent_block_hash", int | None),
            ("token_ids", list[int]),
            ("block_size", int),
            ("lora_id", int | None),
            ("medium", str | None),
            ("lora_name", str | None),
        ],
        **options,
    )
    removed = msgspec.defstruct("BlockRemoved", [("block_hashes", list[int]), ("medium", str | None)], **options)
    cleared = msgspec.defstruct("AllBlocksCleared", [], **options)
    return stored, removed, cleared


EVENT_TYPES = {"array": _event_types(True), "map": _event_types(False)}


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One engine step's events: [ts, [event, ...], data_parallel_rank] on the wire."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


ALL_BLOCKS_CLEARED = ("AllBlocksCleared", [], None, [])  # a drained event meaning "the cache is empty"


def encode_batch(events: list[tuple], block_size: int, wire_format: str, ts: float, rank: int | None) -> bytes:
    """msgpack of a KVEventBatch of drained control-plane events (Scheduler.drain_kv_events tuples)."""
    stored, removed, cleared = EVENT_TYPES[wire_format]
    out = []
    for kind, hashes, parent, tokens in events:
        if kind == "BlockStored":
            out.append(stored(hashes, parent, tokens, block_size, None, MEDIUM_GPU, None))
        elif kind == "BlockRemoved":
            out.append(removed(hashes, MEDIUM_GPU))
        else:
            out.append(cleared())
    return msgspec.msgpack.encode(KVEventBatch(ts, out, rank))


def bind_or_connect(socket: zmq.Socket, endpoint: str) -> None:
    """vLLM's rule: a stable (wildcard or local) address is bound, any other is connected to."""
    if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)


class KVEventPublisher:
    """A ZMQ PUB socket (and an optional replay ROUTER) served by a background thread.

    Every message is three frames: [topic, sequence number (8 bytes, big-endian), msgpack batch].
    Sequence numbers count from 0 per publisher. A replay request on the ROUTER is
    [b"", start (8 bytes, big-endian)] (a REQ socket adds the empty frame); the answer is one
    [b"", seq, batch] message per buffered batch from `start` on, then [b"", END_OF_REPLAY, b""].

    Args:
        config: the KVEventsConfig.
        block_size: tokens per KV block (every BlockStored carries it).
    """

    def __init__(self, config: KVEventsConfig, block_size: int) -> None:
        self.config, self.block_size = config, block_size
        self._topic = config.topic.encode()
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next_seq = 0  # the sequence number of the next batch published
        self.num_dropped = 0
        self._sent = 0  # batches sent (read by wait_sent)
        self._sent_cond = threading.Condition()
        self._context = zmq.Context()
        # Sockets are made and bound here (a bad endpoint fails at engine start), then used only by
        # the thread (starting it hands them over).
        self._pub = self._context.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 1000)
        bind_or_connect(self._pub, config.endpoint)
        self._replay = None
        if config.replay_endpoint:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
        self._thread = threading.Thread(target=self._serve, name="kv-events", daemon=True)
        self._thread.start()

    @property
    def num_published(self) -> int:
        """Batches handed to publish() and not dropped, plus dropped ones (the next sequence number)."""
        return self._next_seq

    def publish(self, events: list[tuple]) -> None:
        """Queues one batch of drained events (Scheduler.drain_kv_events); never blocks."""
        if not events:
            return
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            self._queue.put_nowait((seq, time.time(), events))
        except queue.Full:
            self.num_dropped += 1
            log.warning("kv events: the publisher's queue is full; batch %d dropped", seq)

    def wait_sent(self, timeout: float = 5.0) -> bool:
        """Waits until every batch published so far went out (or was dropped); False on timeout."""
        with self._sent_cond:
            return self._sent_cond.wait_for(lambda: self._sent + self.num_dropped >= self._next_seq, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Sends what is queued (for up to `timeout` seconds), then closes the sockets."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.warning("kv events: closing with %d batches unsent", self._queue.qsize())
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._pub.close()
            if self._replay is not None:
                self._replay.close()
            self._context.term()

    def _serve(self) -> None:
        cfg = self.config
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._answer_replay()
            try:
                item = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            if item is None:
                return
            seq, ts, events = item
            try:
                payload = encode_batch(events, self.block_size, cfg.wire_format, ts, cfg.data_parallel_rank)
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
            except Exception:  # a publisher must not take the engine down
                log.exception("kv events: batch %d not sent", seq)
            with self._sent_cond:
                self._sent += 1
                self._sent_cond.notify_all()

    def _answer_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv events: malformed replay request (%d frames)", len(frames))
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_OF_REPLAY, b""))


def make_publisher(value: KVEventsConfig | Mapping[str, Any] | None, block_size: int) -> KVEventPublisher | None:
    """The publisher an EngineConfig's `kv_events` asks for, or None (events off: nothing is recorded)."""
    config = KVEventsConfig.from_value(value)
    if config is None or not config.publishes:
        return None
    return KVEventPublisher(config, block_size)


__all__ = [
    "ALL_BLOCKS_CLEARED",
    "EVENT_TYPES",
    "KVEventBatch",
    "KVEventPublisher",
    "KVEventsConfig",
    "encode_batch",
    "make_publisher",
]
