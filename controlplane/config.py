"""Typed, frozen configuration of the scheduler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from controlplane import _core


def reject_unknown_keys(cls, values: Mapping[str, Any], what: str) -> None:
    """Raises ValueError naming the keys of `values` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys: {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler is built from; validated by the C++ core.

    Policies are given as ``"name"`` or ``"name:key=value,..."`` strings, e.g.
    ``eviction="ttl:ttl=30"``; the names are those of ``policy_names(kind)``.
    """

    num_blocks: int = 1024
    block_size: int = 16
    num_host_blocks: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunk_size: int = 2048
    # the prefill chunk cap (and, if larger, the token budget) of a step no decode waits in;
    # 0 (or <= chunk_size): chunk_size in every step (docs/controlplane.md, "Chunked prefill")
    idle_chunk_size: int = 0
    max_model_len: int = 131072
    vocab_size: int = 128256
    enable_prefix_caching: bool = True
    ordering: str = "fcfs"
    eviction: str = "lru"
    preemption: str = "recompute"
    # blocks held ahead of a decoding request's next token (1 lets an engine overlap decode steps)
    num_lookahead_tokens: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SchedulerConfig":
        """Builds a config from a mapping, rejecting unknown keys by name."""
        reject_unknown_keys(cls, values, "scheduler config")
        return cls(**values)

    def to_core(self) -> _core.SchedulerConfig:
        core = _core.SchedulerConfig()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = field.type if isinstance(field.type, type) else eval(field.type)  # noqa: S307
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"scheduler config {field.name} must be an int, got {value!r}")
            if expected is bool and not isinstance(value, bool):
                raise ValueError(f"scheduler config {field.name} must be a bool, got {value!r}")
            if expected is str and not isinstance(value, str):
                raise ValueError(f"scheduler config {field.name} must be a string, got {value!r}")
            setattr(core, field.name, value)
        return core
