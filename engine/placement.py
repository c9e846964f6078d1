"""Placement annotations: where each module's inputs, outputs and parameters live across devices.

Models are written for one device. Every module that matters for tensor
parallelism carries a `placement` saying, for a tensor-parallel group, how its
activations and parameters would be laid out (the vocabulary of
torch.distributed.tensor)::

    Replicate()      every rank holds the whole tensor
    Shard(d)         rank i holds the i-th slice along dimension d
    Partial()        every rank holds a partial sum; the true value is their sum

A Llama layer reads, with the residual stream replicated::

    x:R -> norm:R -> qkv(col) -> q,k,v:S(-1) -> attn:S(heads) -> o(row) -> P --all_reduce--> R
        -> norm:R -> gate_up(col) -> S(-1) -> silu*mul:S(-1) -> down(row) -> P --all_reduce--> R

`collectives(model)` is the static pass that walks those annotations in the
order each module declares (`flow`) and lists the collective every mismatch
needs (Partial->Replicate is an all-reduce, Shard->Replicate an all-gather,
Replicate->Shard a local slice); engine.tensor_parallel.shard_model inserts them
and slices the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping


@dataclass(frozen=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Sharded along `dim`; `segments` are sizes of fused parts sharded each on its own (e.g. q|k|v), in
    whole `unit`s (a head's head_dim rows): a part with fewer units than ranks is replicated, each unit
    over size / units ranks (KV heads under GQA; engine.tensor_parallel)."""

    dim: int
    segments: tuple[int, ...] | None = None
    unit: int = 1

    def __repr__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Placement:
    """A module's input and output activation placements and its parameters' placements."""

    input: object
    output: object
    params: Mapping[str, object] = field(default_factory=dict)


def column_parallel(segments: tuple[int, ...] | None = None, unit: int = 1) -> Placement:
    """y = x W^T with W split by output rows: replicated in, sharded out, no communication."""
    rows = Shard(0, segments, unit)
    return Placement(Replicate(), Shard(-1, segments, unit), {"weight": rows, "bias": rows})


def row_parallel() -> Placement:
    """y = x W^T with W split by input columns: sharded in, partial sums out (an all-reduce follows)."""
    return Placement(Shard(-1), Partial(), {"weight": Shard(1), "bias": Replicate()})


def replicated() -> Placement:
    return Placement(Replicate(), Replicate(), {"weight": Replicate()})


def head_local() -> Placement:
    """Per-head work on head-sharded activations (attention, per-head norms)."""
    return Placement(Shard(-1), Shard(-1), {"weight": Replicate()})


@dataclass(frozen=True)
class Collective:
    where: str  # module path whose input needs it
    op: str  # "all_reduce" | "all_gather" | "slice"


def transition(have: object, want: object) -> str | None:
    """The collective that turns placement `have` into `want` (None: none is needed)."""
    if have == want:
        return None
    if isinstance(have, Partial) and isinstance(want, Replicate):
        return "all_reduce"
    if isinstance(have, Shard) and isinstance(want, Replicate):
        return "all_gather"
    if isinstance(have, Replicate) and isinstance(want, Shard):
        return "slice"
    if isinstance(have, Shard) and isinstance(want, Shard):
        return None if have.dim == want.dim else "all_to_all"
    raise ValueError(f"no collective turns {have!r} into {want!r}")


def walk(model) -> Iterator[tuple[str, Placement]]:
    """(module path, placement) of every annotated module of `model`, in execution order (`flow`)."""
    return _walk(model, "")


def _walk(module, prefix: str) -> Iterator[tuple[str, Placement]]:
    flow = getattr(module, "flow", None)
    if flow is None:
        placement = getattr(module, "placement", None)
        if placement is None:
            raise ValueError(f"module {prefix or type(module).__name__} has neither `flow` nor `placement`")
        yield prefix, placement
        return
    for name in flow:
        child = getattr(module, name)
        path = f"{prefix}.{name}" if prefix else name
        if hasattr(child, "__iter__") and not hasattr(child, "flow") and not hasattr(child, "placement"):
            for i, sub in enumerate(child):
                yield from _walk(sub, f"{path}.{i}")
        else:
            yield from _walk(child, path)


def collectives(model, start: object = Replicate(), end: object = Replicate()) -> list[Collective]:
    """The collectives a tensor-parallel run of `model` needs, in execution order."""
    out: list[Collective] = []
    have = start
    for path, placement in _walk(model, ""):
        op = transition(have, placement.input)
        if op is not None:
            out.append(Collective(path, op))
        have = placement.output
    op = transition(have, end)
    if op is not None:
        out.append(Collective("<output>", op))
    return out
