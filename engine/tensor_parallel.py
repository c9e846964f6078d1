"""Tensor parallelism from the placement annotations: a static pass shards a one-device model in place.

    model = CausalLM(config)                # written for one device, annotated (engine/placement.py)
    init_random(model, seed) / load ...     # the whole model's weights (per-rank loading: not yet)
    shard_model(model, TPGroup(rank, size, group))

The pass reads every module's `placement` in execution order (`placement.walk`) and

- slices each parameter its placement shards: `Shard(d)` keeps rank r's r-th part along d; a fused
  weight (`Shard(d, segments)`, q|k|v or gate|up) is sliced segment by segment, in whole `unit`s (heads);
  a segment with fewer units than ranks (KV heads under GQA) gives each rank the unit it serves
  (`size / units` ranks share one), so the KV cache of a rank holds its heads;
- inserts the collective every transition needs where the producing module's output leaves it:
  Partial -> Replicate an all-reduce (after the row-parallel o and down projections, and after the
  vocabulary-parallel embedding), Shard -> Replicate an all-gather (the vocabulary-parallel LM head's
  logits, gathered before sampling). They are forward hooks: no model file holds communication code;
- makes the vocabulary-parallel embedding look up only its rows (ids outside them give zeros, the
  all-reduce sums the ranks' parts) and keeps a row-parallel bias on rank 0 only (added once);
- rewrites `model.config` to this rank's shape (heads, KV heads, intermediate size): the KV cache,
  its block count and every per-rank size follow from it. The vocabulary stays whole in the config (the
  logits are gathered).

A size that does not divide the query heads, the FFN, the vocabulary, or the KV heads (nor is divided by
them) is refused with the reason. Ranks talk through torch.distributed (NCCL on GPUs, gloo on CPUs);
`group=None` means the default process group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.placement import Partial, Replicate, Shard, transition, walk


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in a tensor-parallel group."""

    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup; None: the default one

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of size {self.size} is not a rank of the group")


def check_divisible(config, size: int) -> None:
    """Raises ValueError naming what `size` does not divide in `config` (a ModelConfig)."""
    c = config
    problems = []
    if c.num_heads % size:
        problems.append(f"the {c.num_heads} query heads")
    if c.num_kv_heads % size and size % c.num_kv_heads:
        problems.append(f"the {c.num_kv_heads} KV heads (nor is it a multiple of them)")
    if c.intermediate_size % size:
        problems.append(f"the FFN's {c.intermediate_size} channels")
    if c.vocab_size % size:
        problems.append(f"the vocabulary of {c.vocab_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not divide " + ", ".join(problems))


def local_config(config, size: int):
    """`config` (a ModelConfig) as one rank of `size` holds it."""
    check_divisible(config, size)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // size,
        num_kv_heads=max(1, config.num_kv_heads // size),
        intermediate_size=config.intermediate_size // size,
    )


def _rows(length: int, unit: int, tp: TPGroup) -> tuple[int, int]:
    """(start, count) of rank tp.rank's part of `length` elements cut in whole `unit`s."""
    units = length // unit
    if units % tp.size == 0:
        per = units // tp.size
        return tp.rank * per * unit, per * unit
    if tp.size % units == 0:  # fewer units than ranks: rank r serves unit r // (size / units)
        return (tp.rank // (tp.size // units)) * unit, unit
    raise ValueError(f"{units} units of {unit} cannot be spread over {tp.size} ranks")


def _slice(tensor: torch.Tensor, placement: object, tp: TPGroup, where: str) -> torch.Tensor:
    if not isinstance(placement, Shard):
        return tensor
    dim = placement.dim % tensor.dim()
    segments = placement.segments or (tensor.shape[dim],)
    if sum(segments) != tensor.shape[dim]:
        raise ValueError(f"{where}: segments {segments} do not add up to dimension {dim} ({tensor.shape[dim]})")
    parts, at = [], 0
    for length in segments:
        start, count = _rows(length, placement.unit, tp)
        parts.append(tensor.narrow(dim, at + start, count))
        at += length
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()


def _all_reduce(tp: TPGroup):
    def hook(module, args, out):
        dist.all_reduce(out, group=tp.group)
        return out

    return hook


def _all_gather_last(tp: TPGroup):
    def hook(module, args, out):
        parts = [torch.empty_like(out) for _ in range(tp.size)]
        dist.all_gather(parts, out.contiguous(), group=tp.group)
        return torch.cat(parts, dim=-1)

    return hook


def _vocab_parallel_lookup(embedding, tp: TPGroup) -> None:
    """Ids outside this rank's rows look up row 0 and come out as zeros (the all-reduce sums the parts)."""
    rows = embedding.weight.shape[0]
    start = tp.rank * rows

    def pre(module, args):
        (ids,) = args
        local = ids - start
        module._tp_outside = (local < 0) | (local >= rows)
        return (local.masked_fill(module._tp_outside, 0),)

    def post(module, args, out):
        return out.masked_fill(module._tp_outside[..., None], 0)

    embedding.register_forward_pre_hook(pre)
    embedding.register_forward_hook(post)


def shard_model(model, tp: TPGroup):
    """Shards `model` (a CausalLM holding the whole model's weights) in place for rank tp.rank; returns it."""
    from engine.models.decoder import Attention, LMHead, Linear, PagedAttention, VocabEmbedding

    config = model.config
    check_divisible(config, tp.size)
    if tp.size == 1:
        return model
    modules = list(walk(model))
    # parameters: sliced per their placement (a tied LM head shares the embedding's, sliced once)
    for path, placement in modules:
        module = model.get_submodule(path)
        for name, where in placement.params.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and isinstance(where, Shard):
                param.data = _slice(param.data, where, tp, f"{path}.{name}")
        if isinstance(module, Linear) and module.bias is not None and isinstance(placement.output, Partial):
            if tp.rank != 0:  # the all-reduce sums the ranks' outputs: the bias must enter once
                module.bias.data.zero_()
    # a vocabulary-parallel embedding's own lookup (before its all-reduce hook: hooks run in order)
    for module in model.modules():
        if isinstance(module, VocabEmbedding):
            _vocab_parallel_lookup(module, tp)
    # the collectives, where a module's output placement meets a different one downstream
    for i, (path, placement) in enumerate(modules):
        have = placement.output
        want = modules[i + 1][1].input if i + 1 < len(modules) else Replicate()
        op = transition(have, want)
        module = model.get_submodule(path)
        if op == "all_reduce":
            module.register_forward_hook(_all_reduce(tp))
        elif op == "all_gather" and isinstance(module, LMHead):
            module.register_forward_hook(_all_gather_last(tp))
        elif op not in (None, "slice"):  # R -> S needs none: every rank computes its own slice
            raise ValueError(f"{path}: no {op} is implemented from {have!r} to {want!r} here")
    # module-local semantics of a sharded module, and this rank's sizes
    local = local_config(config, tp.size)
    for module in model.modules():
        if isinstance(module, Attention):
            module.hq, module.hk = local.num_heads, local.num_kv_heads
        elif isinstance(module, PagedAttention):
            module.num_heads, module.num_kv_heads = local.num_heads, local.num_kv_heads
    model.config = local
    model.tp = tp
    return model


__all__ = ["TPGroup", "check_divisible", "local_config", "shard_model"]
