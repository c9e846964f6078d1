"""Tensor parallelism from the placement annotations: a static pass shards a one-device model in place.

    model = CausalLM(config)                # written for one device, annotated (engine/placement.py)
    shard_model(model, TPGroup(rank, size, group))

on a model holding the whole model's weights (tests), or, as the engine loads, on the meta device before
any weight exists: `engine.loader.load_model(..., tp=TPGroup(rank, size))` shards the empty model and
then reads only this rank's part of each checkpoint tensor (`model.tp_checkpoint_parts`), so no rank
ever holds another's weights.

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
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.placement import Partial, Replicate, Shard, transition, walk

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Part:
    """A rank's part of a whole tensor: along `dim` (of length `whole`), the concatenation of `ranges`
    ((start, count) pairs; one per fused segment)."""

    dim: int
    whole: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(count for _, count in self.ranges)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This part of `tensor` (the whole one), a new tensor."""
        return self.view(tensor).clone() if len(self.ranges) == 1 else self.view(tensor)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This part of `tensor`: a view where it is one range, a new tensor where it is several."""
        parts = [tensor.narrow(self.dim, start, count) for start, count in self.ranges]
        return torch.cat(parts, self.dim) if len(parts) > 1 else parts[0]

    def within(self, offset: int, length: int) -> Part:
        """The part of elements offset..offset+length along `dim` (one fused segment, a checkpoint tensor)."""
        ranges = []
        for start, count in self.ranges:
            lo, hi = max(start, offset), min(start + count, offset + length)
            if lo < hi:
                ranges.append((lo - offset, hi - lo))
        return Part(self.dim, length, tuple(ranges))


def rank_part(shape: tuple[int, ...], placement: object, tp: TPGroup, where: str = "") -> Part | None:
    """Rank tp.rank's part of a whole tensor of `shape` placed as `placement`; None: it keeps the whole.

    `Shard(d)` keeps the rank's slice along d; a fused `Shard(d, segments)` one slice per segment, in whole
    `unit`s (a segment with fewer units than ranks: the unit this rank serves)."""
    if not isinstance(placement, Shard) or tp.size == 1:
        return None
    dim = placement.dim % len(shape)
    segments = placement.segments or (shape[dim],)
    if sum(segments) != shape[dim]:
        raise ValueError(f"{where}: segments {segments} do not add up to dimension {dim} ({shape[dim]})")
    ranges, at = [], 0
    for length in segments:
        start, count = _rows(length, placement.unit, tp)
        ranges.append((at + start, count))
        at += length
    return Part(dim, shape[dim], tuple(ranges))


def _checkpoint_parts(model, param_parts: dict[str, tuple[tuple[int, ...], Part]]) -> dict[str, Part]:
    """Checkpoint (Hugging Face) tensor name -> this rank's part, for every sharded one: a fused parameter's
    parts (q|k|v, gate|up, and their FP8 scales) cut back to the checkpoint's own tensors."""
    out = {name: part for name, (_, part) in param_parts.items()}
    for name, (target, offset, rows) in model.fused_targets().items():
        for suffix in ("", "_scale"):
            if target + suffix in param_parts:
                out[name + suffix] = param_parts[target + suffix][1].within(offset, rows)
                out.pop(target + suffix, None)
    return out


def _partial_biases(model) -> list[torch.Tensor]:
    """The biases of modules whose outputs are partial sums (row-parallel): the all-reduce adds them once
    per rank, so every rank but 0 holds zeros."""
    from engine.models.decoder import Linear

    return [
        module.bias
        for _, module in model.named_modules()
        if isinstance(module, Linear) and module.bias is not None and isinstance(module.placement.output, Partial)
    ]


def zero_partial_biases(model) -> None:
    """After loading a sharded model's weights (whole biases on every rank): zeros on ranks other than 0."""
    tp = getattr(model, "tp", None)
    if tp is not None and tp.rank != 0:
        for bias in _partial_biases(model):
            bias.data.zero_()


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
    from engine.models.decoder import Attention, LMHead, PagedAttention, VocabEmbedding

    config = model.config
    check_divisible(config, tp.size)
    if tp.size == 1:
        return model
    modules = list(walk(model))
    # parameters: sliced per their placement (a tied LM head shares the embedding's, sliced once); each
    # one's whole shape and part are kept for loaders that read only this rank's part (engine.loader)
    parts: dict[str, tuple[tuple[int, ...], Part]] = {}
    for path, placement in modules:
        module = model.get_submodule(path)
        for name, where in placement.params.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and isinstance(where, Shard):
                full = f"{path}.{name}" if path else name
                part = rank_part(tuple(param.shape), where, tp, full)
                parts[full] = (tuple(param.shape), part)
                param.data = part.take(param.data)
    if tp.rank != 0:  # the all-reduce sums the ranks' outputs: a row-parallel bias must enter once
        for bias in _partial_biases(model):
            bias.data.zero_()
    model.tp_param_parts = parts
    model.tp_checkpoint_parts = _checkpoint_parts(model, parts)  # the whole config's fused layout
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


START_TIMEOUT_S = 600.0  # how long rank 0 waits for the other ranks to join (a rank that exits: at once)


class RankExited(RuntimeError):
    """A tensor-parallel rank's process ended: the group cannot step."""


def check_can_start(size: int, device: torch.device) -> None:
    """Raises before anything loads or starts where a group of `size` ranks cannot: another group already in
    this process (torch.distributed has one default group a process), fewer visible GPUs than ranks."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already runs a tensor-parallel engine (one a process): close it first "
            "(LLM.close(), EngineCore.close())"
        )
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} GPUs; {torch.cuda.device_count()} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )


def _setup_device(rank: int, device: torch.device) -> None:
    if device.type == "cuda":
        # NVLink multicast (NVLS) stays off unless asked for: on shared hosts a program using it can take the
        # host's GPUs out of service; the ranks inherit this process's environment
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(rank)


def _store(port: int, size: int, master: bool):
    """The group's rendezvous store: rank 0 holds it (port 0: a free one, `store.port`), the others connect
    (retrying until the master listens)."""
    import datetime

    timeout = datetime.timedelta(seconds=START_TIMEOUT_S)
    return dist.TCPStore("127.0.0.1", port, size, master, timeout=timeout, wait_for_workers=False)


def _join(rank: int, size: int, store, device: torch.device) -> None:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=size)


def _ended(procs: list) -> tuple[int, int] | None:
    """(rank, exit code) of the first of ranks 1.. (`procs`, their processes) that has ended; None if none."""
    for rank, proc in enumerate(procs, start=1):
        code = proc.poll()
        if code is not None:
            return rank, code
    return None


def _wait_for_ranks(store, procs: list) -> None:
    """Until every rank has loaded its shard and said so; a rank whose process ends first fails this at once
    with its exit code (not after the rendezvous timeout)."""
    import time

    deadline = time.monotonic() + START_TIMEOUT_S
    keys = [f"tandem/up/{rank}" for rank in range(1, len(procs) + 1)]
    while not store.check(keys):
        ended = _ended(procs)
        if ended is not None:
            raise RankExited("tensor-parallel rank %d exited with code %d before joining (its error is above)" % ended)
        if time.monotonic() > deadline:
            waiting = [rank for rank, key in enumerate(keys, start=1) if not store.check([key])]
            raise RuntimeError(f"tensor-parallel ranks {waiting} did not join within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


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

        store = _store(0, self.size, master=True)
        port = store.port
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
        try:
            _setup_device(0, device)
            _wait_for_ranks(store, self.procs)
            _join(0, self.size, store, device)
        except BaseException:
            self._end_ranks(timeout=5)
            raise
        self._watch()
        return TPGroup(0, self.size)

    def _watch(self) -> None:
        """A thread that logs, once, a rank ending while the group runs: with gloo the next collective then
        fails (send raises RankExited); with NCCL it waits until NCCL's timeout, so the log says why."""
        import threading
        import time

        procs = list(self.procs)

        def watch() -> None:
            while self.procs:  # stop() empties it
                ended = _ended(procs)
                if ended is not None and self.procs:
                    log.error(
                        "tensor-parallel rank %d exited with code %s: the engine cannot step (a collective "
                        "fails, or with NCCL waits until its timeout)",
                        *ended,
                    )
                    return
                time.sleep(1.0)

        threading.Thread(target=watch, name="tp-ranks-watch", daemon=True).start()

    def check_ranks(self) -> None:
        """Raises RankExited naming a rank whose process has ended (a step would wait on it)."""
        ended = _ended(self.procs)
        if ended is not None:
            raise RankExited("tensor-parallel rank %d exited with code %d; the engine cannot step" % ended)

    def send(self, message) -> None:
        self.check_ranks()  # a poll a rank: microseconds
        try:
            dist.broadcast_object_list([message], src=0)
        except RuntimeError:  # gloo: a peer's connection reset; name the rank where one ended
            import time

            time.sleep(0.5)
            self.check_ranks()
            raise

    def send_step(self, plan, block_size: int) -> None:
        self.send(("step", step_message(plan, block_size)))

    def time_collectives(
        self, tokens: int, hidden: int, vocab_part: int, dtype: torch.dtype, device: torch.device, iters: int = 20
    ) -> tuple[float, float]:
        """`time_collectives` on every rank (between steps): rank 0's (all-reduce, all-gather) seconds."""
        buffers = _collective_buffers(tokens, hidden, vocab_part, dtype, device)  # before the ranks wait on them
        self.send(("collectives", (tokens, hidden, vocab_part, str(dtype).removeprefix("torch."), iters)))
        return _time_collectives(*buffers, device, iters)

    def stop(self) -> None:
        if not self.procs:
            return
        whole = _ended(self.procs) is None  # a group missing a rank takes no message
        try:
            if whole:
                self.send(("stop", None))
        finally:
            self._end_ranks(timeout=30 if whole else 1)
            if dist.is_initialized():
                dist.destroy_process_group()

    def _end_ranks(self, timeout: float) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except Exception:
                proc.kill()
                proc.wait()
        self.procs = []


def time_collectives(
    tokens: int, hidden: int, vocab_part: int, dtype: torch.dtype, device: torch.device, iters: int = 20
) -> tuple[float, float]:
    """Median seconds of one all-reduce of a step's hidden states ([tokens, hidden]) and of one all-gather
    of its logits ([tokens, vocab_part] from each rank), the collectives a step runs (shard_model): every
    rank of the group calls it with the same arguments (TPDriver.time_collectives); the times are this rank's."""
    return _time_collectives(*_collective_buffers(tokens, hidden, vocab_part, dtype, device), device, iters)


def _collective_buffers(tokens: int, hidden: int, vocab_part: int, dtype: torch.dtype, device: torch.device):
    x = torch.zeros(tokens, hidden, dtype=dtype, device=device)
    part = torch.zeros(tokens, vocab_part, dtype=dtype, device=device)
    return x, part, [torch.empty_like(part) for _ in range(dist.get_world_size())]


def _time_collectives(x, part, gathered, device: torch.device, iters: int) -> tuple[float, float]:
    import statistics
    import time

    def timed(op) -> float:
        times = []
        for _ in range(iters + 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            op()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:])

    return timed(lambda: dist.all_reduce(x)), timed(lambda: dist.all_gather(gathered, part))


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
    _setup_device(rank, device)
    store = _store(port, size, master=False)
    try:
        torch.manual_seed(cfg.seed)
        # this rank's part only, before joining: a rank that cannot load fails rank 0's start at once
        model = load_model(cfg, device, dtype, TPGroup(rank, size)).model
        store.set(f"tandem/up/{rank}", "1")
        _join(rank, size, store, device)
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
                if kind == "collectives":
                    tokens, hidden, vocab_part, name, iters = message
                    time_collectives(tokens, hidden, vocab_part, getattr(torch, name), device, iters)
                    continue
                kv_ops, batch, rows = message
                if kv_ops is not None:
                    runner.copy_blocks(kv_ops)
                if batch is not None:
                    runner.forward_rows(batch, rows)
    finally:
        if dist.is_initialized():
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


__all__ = [
    "Part",
    "RankExited",
    "TPDriver",
    "TPGroup",
    "check_can_start",
    "check_divisible",
    "local_config",
    "rank_part",
    "shard_model",
    "step_message",
    "time_collectives",
    "tp_min",
    "zero_partial_biases",
]


if __name__ == "__main__":
    main()
