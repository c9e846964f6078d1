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
import os
from dataclasses import dataclass

import numpy as np
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


# ------------------------------------------------------------------------------ the engine's ranks
#
# One control plane: rank 0 (the EngineCore's process) loads, shards, sizes the KV cache and runs the
# scheduler. Ranks 1..N-1 are spawned processes (TPDriver.start): each loads the same model, shards it, builds
# a ModelRunner with rank 0's KV geometry (the same block count everywhere) and then, each step, receives
# what rank 0's runner is about to run (its KV copies, the reordered batch and its block-table rows) and
# runs the same forward on its shard; the collectives inside keep the ranks in step. Only rank 0 samples and
# commits. Steps travel as pickled objects over torch.distributed (broadcast_object_list).


def _init(rank: int, size: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_message(plan, block_size: int):
    """(KV copies, batch, block-table rows) of a plan: what every other rank needs to run its step."""
    from engine.runner import reorder_decodes_first, table_rows

    ops = np.asarray(plan.kv_ops).copy() if len(plan.kv_ops) else None
    if plan.num_tokens == 0:
        return ops, None, None
    batch = reorder_decodes_first(plan)
    return ops, batch, table_rows(batch, plan, block_size)


class TPDriver:
    """Rank 0's end of the group: starts the other ranks, sends them each step, stops them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.procs: list = []

    def start(self, config, device: torch.device) -> TPGroup:
        """Starts ranks 1..size-1 (`python -m engine.tensor_parallel`: plain processes, so that an engine
        core which is itself a daemon process may start them) and joins the group as rank 0."""
        import pickle
        import subprocess
        import sys

        port = _free_port()
        values = pickle.dumps(dataclasses.asdict(config))
        for rank in range(1, self.size):
            cmd = [
                sys.executable,
                "-m",
                "engine.tensor_parallel",
                str(rank),
                str(self.size),
                str(port),
                str(os.getpid()),
            ]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
            proc.stdin.write(values)
            proc.stdin.close()
            self.procs.append(proc)
        _init(0, self.size, port, device)
        return TPGroup(0, self.size)

    def send(self, message) -> None:
        dist.broadcast_object_list([message], src=0)

    def send_step(self, plan, block_size: int) -> None:
        self.send(("step", step_message(plan, block_size)))

    def stop(self) -> None:
        if not self.procs:
            return
        try:
            self.send(("stop", None))
        finally:
            for proc in self.procs:
                try:
                    proc.wait(timeout=30)
                except Exception:
                    proc.kill()
            self.procs = []
            if dist.is_initialized():
                dist.destroy_process_group()


def tp_min(num_blocks: int, num_host_blocks: int, device: torch.device) -> tuple[int, int]:
    """The smallest of every rank's (device blocks, host blocks): a collective every rank calls."""
    sizes = torch.tensor([num_blocks, num_host_blocks], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN)
    return int(sizes[0]), int(sizes[1])


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _worker(values: dict, rank: int, size: int, port: int) -> None:
    """Rank `rank`: the same model, sharded; rank 0's runner geometry; then its steps until told to stop."""
    from engine.config import EngineConfig
    from engine.core import resolve_device, resolve_dtype
    from engine.kernels.registry import KernelSet
    from engine.loader import load_model
    from engine.memory import size_kv_cache
    from engine.runner import ModelRunner

    cfg = EngineConfig.from_dict(values)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    _init(rank, size, port, device)
    try:
        torch.manual_seed(cfg.seed)
        model = load_model(cfg, device, dtype).model
        shard_model(model, TPGroup(rank, size))
        ops = KernelSet.default_for(device.type, cfg.kernel_backend, cfg.kernel_overrides)
        kind, (max_model_len, idle_chunk_size) = _receive()
        assert kind == "sizing", kind
        tp_min(*size_kv_cache(model, ops, cfg, device, dtype, max_model_len, idle_chunk_size), device)
        kind, geometry = _receive()
        assert kind == "geometry", kind
        runner = ModelRunner(model, ops, device, dtype, **geometry)
        with torch.inference_mode():
            while True:
                kind, message = _receive()
                if kind == "stop":
                    break
                kv_ops, batch, rows = message
                if kv_ops is not None:
                    runner.copy_blocks(kv_ops)
                if batch is not None:
                    runner.forward_rows(batch, rows)
    finally:
        dist.destroy_process_group()


def _watch_parent(pid: int) -> None:
    """Ends this rank when rank 0's process is gone (it would otherwise wait on the group forever)."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except OSError:
                os._exit(1)

    threading.Thread(target=watch, name="rank0-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.tensor_parallel RANK SIZE PORT PARENT_PID`, the EngineConfig's fields pickled on stdin."""
    import pickle
    import sys

    rank, size, port, parent = (int(a) for a in (argv or sys.argv[1:]))
    values = pickle.loads(sys.stdin.buffer.read())
    _watch_parent(parent)
    _worker(values, rank, size, port)


__all__ = ["TPDriver", "TPGroup", "check_divisible", "local_config", "shard_model", "step_message", "tp_min"]


if __name__ == "__main__":
    main()
