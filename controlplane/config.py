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


_TYPES = {
    "int": (int, "an int"),
    "int | None": (int, "an int or None"),
    "bool": (bool, "a bool"),
    "str": (str, "a string"),
    "tuple[str, ...]": (tuple, "a list of module names"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything the scheduler is built from: the one `scheduler:` section of the engine's and the
    simulator's configs (conf/scheduler/*.yaml), validated by `validate` and the C++ core.

    Policies are given as ``"name"`` or ``"name:key=value,..."`` strings, e.g.
    ``eviction="ttl:ttl=30"``; the names are those of ``policy_names(kind)``, Python ones registered
    by importing ``policy_modules``. The plane that runs the scheduler sets ``num_blocks`` and
    ``num_host_blocks`` (sized from memory), ``vocab_size`` (the model's) and, in the engine,
    ``num_lookahead_tokens`` (from overlap_decode) with ``dataclasses.replace``. ``idle_chunk_size``
    and ``max_model_len`` of None mean the plane's default, which it must resolve before ``to_core``:
    the engine's are chosen by device and kernels and the model's length (docs/engine.md), the
    simulator's are these defaults.
    """

    num_blocks: int = 1024
    block_size: int = 16
    num_host_blocks: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunk_size: int = 2048
    # the prefill chunk cap (and, if larger, the token budget) of a step no decode waits in;
    # 0 (or <= chunk_size): chunk_size in every step (docs/controlplane.md, "Chunked prefill")
    idle_chunk_size: int | None = 0
    max_model_len: int | None = 131072
    vocab_size: int = 128256
    enable_prefix_caching: bool = True
    ordering: str = "fcfs"
    eviction: str = "lru"
    preemption: str = "recompute"
    # how much of each prefill chunk, and which new requests, a step takes: "all", or
    # "tps_floor:tok_s=70" (a per-user speed floor kept by the plane's step-cost model; docs/policies.md)
    admission: str = "all"
    # blocks held ahead of a decoding request's next token (1 lets an engine overlap decode steps)
    num_lookahead_tokens: int = 0
    # modules that register Python policies (controlplane.register_policy), imported first
    policy_modules: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SchedulerConfig":
        """Builds a config from a mapping, rejecting unknown keys by name."""
        reject_unknown_keys(cls, values, "scheduler config")
        modules = values.get("policy_modules", ())
        return cls(**{**values, "policy_modules": modules if isinstance(modules, str) else tuple(modules)})

    def validate(self) -> None:
        """Checks types, sizes and policy specs (importing policy_modules first); raises ValueError."""
        from controlplane.policies import check_spec, import_policy_modules

        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), _TYPES[field.type]
            if value is None and field.type.endswith("None"):
                continue
            if not isinstance(value, kind[0]) or (kind[0] is int and isinstance(value, bool)):
                raise ValueError(f"scheduler.{field.name} must be {kind[1]}, got {value!r}")
            if kind[0] is int and value < 0:
                raise ValueError(f"scheduler.{field.name} must be >= 0, got {value!r}")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"scheduler.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.num_lookahead_tokens <= self.block_size:
            raise ValueError(
                f"scheduler.num_lookahead_tokens must be in [0, block_size], got {self.num_lookahead_tokens}"
            )
        import_policy_modules(self.policy_modules)
        for kind in ("ordering", "eviction", "preemption", "admission"):
            check_spec(kind, getattr(self, kind))

    def to_core(self) -> _core.SchedulerConfig:
        self.validate()
        core = _core.SchedulerConfig()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                raise ValueError(f"scheduler.{field.name} is None (the plane's default): resolve it before to_core")
            if field.name != "policy_modules":
                setattr(core, field.name, value)
        return core
