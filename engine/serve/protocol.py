"""Messages between the gateway and the engine-core process: msgpack-encoded msgspec records.

    gateway -> core:  Add, Abort, EndSession, Shutdown
    core -> gateway:  Ready, Tokens (one per step: every request that got a token), Finished,
                      Rejected (an Add the engine refused), SessionEnded (the answer to EndSession),
                      Stats (every ~0.5 s), KvEvents (data-parallel only: what entered and left the
                      prefix index, sent before the step's Tokens so that it is ordered with them)

Token batches carry flat arrays (ids, tokens, logprobs) rather than one record
per token, so one step is one small message whatever the batch size.
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

from engine.output import Finished  # the engine's record of a finished request, sent as it is


class Add(msgspec.Struct, tag=True, array_like=True):
    req_id: int
    prompt: bytes  # token ids as little-endian int32 (see pack_ids): a 50K-token
    # prompt is one 200 KB copy, not 50K msgpack integers
    params: dict  # engine.sampling.SamplingParams fields
    session_id: str | None = None
    cache_namespace: str | None = None
    priority: int = 0


class Abort(msgspec.Struct, tag=True, array_like=True):
    req_ids: list[int]


class EndSession(msgspec.Struct, tag=True, array_like=True):
    session_id: str


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class Ready(msgspec.Struct, tag=True, array_like=True):
    model: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    device: str
    dtype: str
    kv_bytes: int  # of the num_blocks KV blocks
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype in effect
    quantization: str = "none"  # the weights' quantization in effect ("fp8" also from an FP8 checkpoint)
    idle_chunk_size: int = 0  # the prefill chunk of steps no decode waits in, resolved (0: chunk_size's)


class Tokens(msgspec.Struct, tag=True, array_like=True):
    req_ids: list[int]
    tokens: list[int]
    sent_at: float = 0.0  # time.perf_counter() in the core (CLOCK_MONOTONIC: one clock
    # for every process of the machine), for the IPC latency metric
    logprobs: list[float] | None = None  # of each sampled token
    top_ids: list[list[int]] | None = None  # [k][N]
    top_logprobs: list[list[float]] | None = None


class Rejected(msgspec.Struct, tag=True, array_like=True):
    req_id: int
    message: str


class SessionEnded(msgspec.Struct, tag=True, array_like=True):
    session_id: str
    known: bool  # False: the core never had it, or it was already ended


class Stats(msgspec.Struct, tag=True, array_like=True):
    values: dict  # controlplane Stats.as_dict() plus engine counters


class KvEvents(msgspec.Struct, tag=True, array_like=True):
    events: list[tuple[str, list[int]]]  # (BlockStored | BlockRemoved | AllBlocksCleared, block hashes), in order


def pack_ids(ids) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4")


ToCore = Union[Add, Abort, EndSession, Shutdown]
FromCore = Union[Ready, Tokens, Finished, Rejected, SessionEnded, Stats, KvEvents]

_to_core_enc = msgspec.msgpack.Encoder()
_to_core_dec = msgspec.msgpack.Decoder(ToCore)
_from_core_dec = msgspec.msgpack.Decoder(FromCore)


def encode(msg) -> bytes:
    return _to_core_enc.encode(msg)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core_dec.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core_dec.decode(data)
