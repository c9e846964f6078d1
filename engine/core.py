"""The engine core: the control plane's scheduler driving a model runner, one loop step at a time.

    EngineCore.step():  controlplane.loop_step(scheduler, runner, clock)
                        = plan = step(now); tokens = runner.run(plan); commit(plan, tokens, now)

It is the simulator's replica loop with a GPU in place of the step-cost model.
Each step's plan features and measured seconds are recorded in the format the
simulator's `profile` cost model reads (docs/profile-format.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref

import numpy as np
import torch

import controlplane as cp
from controlplane.profile import plan_features, write_profile
from engine.attention import is_fp8, resolve_kv_cache_dtype
from engine.config import AUTO_IDLE_CHUNK_SIZE, EngineConfig
from engine.kernels import KernelSet
from engine.kv_events import ALL_BLOCKS_CLEARED, KVEventPublisher, KVEventsConfig, make_publisher
from engine.loader import LoadedModel, load_config, load_model
from engine.memory import size_kv_cache
from engine.output import Finished, StepOutput
from engine.runner import ModelRunner
from engine.sampling import SamplingParams, SequenceState, make_generator
from engine.tensor_parallel import TPDriver, TPGroup, check_can_start, check_divisible, shard_model, tp_min

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# Triton's float8e4nv (the FP8 KV cache in its kernels) compiles for compute capability 8.9+ only
FP8_KV_MIN_CAPABILITY = (8, 9)


def check_fp8_kv_support(device: torch.device, kv_dtype: torch.dtype, chosen: dict[str, str]) -> None:
    """Raises ValueError for an FP8 KV cache whose chosen Triton kernels cannot run on this GPU (pre-Ada)."""
    if device.type != "cuda" or not is_fp8(kv_dtype):
        return
    triton_ops = sorted(
        op
        for op in ("write_kv", "rotary_write_kv", "prefill_attention", "decode_attention", "rotary_decode_attention")
        if chosen.get(op) == "triton"
    )
    capability = torch.cuda.get_device_capability(device)
    if triton_ops and tuple(capability) < FP8_KV_MIN_CAPABILITY:
        raise ValueError(
            f"kv_cache_dtype=fp8_e4m3 with the triton kernels ({', '.join(triton_ops)}) needs a GPU of "
            f"compute capability {FP8_KV_MIN_CAPABILITY[0]}.{FP8_KV_MIN_CAPABILITY[1]}+ (Ada, Hopper); "
            f"this one is {capability[0]}.{capability[1]}: use kv_cache_dtype=auto, or "
            f"kernel_backend torch or jax"
        )


def make_step_cost(cfg: EngineConfig, dtype: torch.dtype, quantization: str | None = None):
    """The simulator's cost model of this engine (cfg.step_cost), at its dtype, KV cache dtype and weight
    quantization (`quantization`: the weights as loaded, cfg.quantization where not given; an FP8 checkpoint
    loads FP8 whatever cfg says), or None; what an admission policy (scheduler.admission) predicts step times
    with."""
    if cfg.step_cost is None:
        return None
    from sim.cost import make_cost_model
    from sim.specs import load_hardware_spec, load_model_spec

    opts = cfg.step_cost
    spec = dataclasses.replace(
        load_model_spec(opts["model"]),
        dtype_bytes=dtype.itemsize,
        kv_cache_dtype=cfg.kv_cache_dtype,
        quantization=quantization or cfg.quantization,
    )
    cost = make_cost_model(
        opts.get("cost_model", "roofline"), spec, load_hardware_spec(opts["hardware"]), opts.get("profile_path")
    )
    if getattr(cost, "native", None) is None:
        raise ValueError(f"step_cost: cost model {opts.get('cost_model')!r} has no C++ evaluator to predict with")
    return cost


class EngineCore:
    """Loads the model, sizes the KV cache, builds the scheduler and the runner.

    Args:
        config: the EngineConfig.
        clock: a controlplane Clock; the wall clock by default. A ManualClock
            advanced by measured step times makes runs replayable in the simulator.
        loaded: an already loaded model (LoadedModel) to reuse instead of loading `config.model`.
    """

    def __init__(self, config: EngineConfig, clock: cp.Clock | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = cfg = config
        kv_events = KVEventsConfig.from_value(cfg.kv_events)  # a bad one fails before the model loads
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        # the KV cache's element type: the model's, or float8_e4m3fn with per-token, per-head scales (docs/fp8.md)
        self.kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, self.dtype)
        torch.manual_seed(cfg.seed)
        if cfg.tensor_parallel_size > 1:  # what a group cannot do, before any weight loads or rank starts
            check_divisible(loaded.config if loaded is not None else load_config(cfg), cfg.tensor_parallel_size)
            check_can_start(cfg.tensor_parallel_size, self.device)
        if loaded is None:  # with TP, rank 0's shard only (each rank reads its own part of the weights)
            tp = TPGroup(0, cfg.tensor_parallel_size) if cfg.tensor_parallel_size > 1 else None
            loaded = load_model(cfg, self.device, self.dtype, tp)
        elif cfg.quantization != "none" and loaded.quantization != cfg.quantization:
            raise ValueError(
                f"quantization={cfg.quantization} but the model given (loaded=) holds {loaded.quantization} weights: "
                f"load it with quantization={cfg.quantization}, or leave the option out"
            )
        self.model, self.model_config, self.tokenizer, self.source = (
            loaded.model,
            loaded.config,
            loaded.tokenizer,
            loaded.source,
        )
        self.quantization = loaded.quantization  # the weights as loaded (an FP8 checkpoint: fp8 whatever cfg says)
        mc = self.model_config
        self.tp = None  # rank 0's end of a tensor-parallel group (engine.tensor_parallel)
        if cfg.tensor_parallel_size > 1:
            self.tp = TPDriver(cfg.tensor_parallel_size)
            # the ranks load what rank 0 holds: a model given loaded may be FP8 where the option is not
            group = self.tp.start(dataclasses.replace(cfg, quantization=self.quantization), self.device)
            if getattr(self.model, "tp", None) is None:  # a model given whole (`loaded`): shard it here
                shard_model(self.model, group)
            self._tp_finalizer = weakref.finalize(self, self.tp.stop)
        self.ops = KernelSet.default_for(self.device.type, cfg.kernel_backend, cfg.kernel_overrides)
        check_fp8_kv_support(self.device, self.kv_dtype, self.ops.chosen)
        sc = cfg.scheduler
        self.max_model_len = sc.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {mc.max_position_embeddings}"
            )
        # auto: large prefill chunks in steps no decode waits in, where prefill attention is tiled (the torch
        # reference materializes a chunk's scores against its whole context)
        self.idle_chunk_size = (
            sc.idle_chunk_size
            if sc.idle_chunk_size is not None
            else (
                AUTO_IDLE_CHUNK_SIZE
                if self.device.type == "cuda" and self.ops.chosen["prefill_attention"] != "torch"
                else 0
            )
        )
        if self.tp is not None:  # every rank sizes its cache (a profiling forward runs the collectives)
            self.tp.send(("sizing", (self.max_model_len, self.idle_chunk_size)))
        self.num_blocks, self.num_host_blocks = size_kv_cache(
            self.model, self.ops, cfg, self.device, self.dtype, self.max_model_len, self.idle_chunk_size
        )
        if self.tp is not None:  # the same block count on every rank: the smallest
            self.num_blocks, self.num_host_blocks = tp_min(self.num_blocks, self.num_host_blocks, self.device)
        graphs = (
            ()
            if (cfg.enforce_eager or self.device.type != "cuda" or self.ops.chosen["decode_attention"] == "torch")
            else cfg.cuda_graph_batch_sizes
        )
        if self.tp is not None and graphs:  # not yet: graphs that capture the collectives
            log.warning(
                "tensor_parallel_size=%d: decode runs without CUDA graphs (not yet captured with the collectives) "
                "and without overlap; enforce_eager=true says so and silences this",
                cfg.tensor_parallel_size,
            )
            graphs = ()
        # auto: where decode runs as CUDA graphs of Triton kernels (XLA's kernels run on streams of their own)
        auto = bool(graphs) and self.ops.chosen["decode_attention"] == "triton"
        self.overlap = auto if cfg.overlap_decode is None else cfg.overlap_decode
        if self.tp is not None and self.overlap:
            raise ValueError("overlap_decode is not supported with tensor_parallel_size > 1 yet")
        self.scheduler_config = dataclasses.replace(
            sc,
            num_blocks=self.num_blocks,
            num_host_blocks=self.num_host_blocks,
            idle_chunk_size=self.idle_chunk_size,
            max_model_len=self.max_model_len,
            vocab_size=mc.vocab_size,
            num_lookahead_tokens=1 if self.overlap else 0,
        )
        self.scheduler = cp.Scheduler(self.scheduler_config)
        # the simulator's cost model of this engine, for an admission policy that predicts step times
        self.step_cost = make_step_cost(cfg, self.dtype, self.quantization)
        self._give_step_cost()
        self.lookahead = None
        self._start_lookahead()
        # None: events off, and the control plane records none
        self.kv_events: KVEventPublisher | None = make_publisher(kv_events, sc.block_size)
        self.kept_kv_events: list | None = None  # see keep_kv_events()
        self._start_kv_events()
        geometry = dict(
            num_blocks=self.num_blocks,
            block_size=sc.block_size,
            num_host_blocks=self.num_host_blocks,
            max_model_len=self.max_model_len,
            max_num_seqs=sc.max_num_seqs,
            max_blocks_per_seq=self.scheduler.max_blocks_per_seq,
            seed=cfg.seed,
            kv_dtype=self.kv_dtype,
        )
        self.runner = ModelRunner(
            self.model, self.ops, self.device, self.dtype, graph_batch_sizes=graphs, overlap=self.overlap, **geometry
        )
        if self.tp is not None:
            self.tp.send(("geometry", geometry))
            self.runner.tp = self.tp
        elif self.ops.chosen["prefill_attention"] == "triton":
            self._warm_up_cudnn_prompt(sc)
        self.clock = clock or cp.WallClock()
        self.profile: list[dict] = []
        self.eos_token_ids = tuple(mc.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            if self.tokenizer.eos_token_id not in self.eos_token_ids:
                self.eos_token_ids = (self.tokenizer.eos_token_id,) + self.eos_token_ids

    def _warm_up_cudnn_prompt(self, sc) -> None:
        """Runs a lone long prompt's chunks' attention once, on the KV cache's first blocks (their contents do
        not matter), so that cuDNN plans their graphs and Triton compiles the context copy at start, not in the
        first requests (engine.kernels.cudnn_prompt)."""
        from engine.kernels import cudnn_prompt

        mc, kv, bs = self.model_config, self.runner.kv, sc.block_size
        # the chunk the scheduler cuts a prompt into when nothing else runs (csrc/scheduler.h)
        idle = self.idle_chunk_size
        chunk = idle if idle > sc.chunk_size else min(sc.chunk_size, sc.max_num_batched_tokens)
        prefixes = cudnn_prompt.warm_up_prefixes(chunk, self.max_model_len, mc.num_kv_heads, mc.head_dim, self.dtype)
        if not prefixes:
            return
        q = torch.zeros((chunk, mc.num_heads, mc.head_dim), dtype=self.dtype, device=self.device)
        i32 = dict(dtype=torch.int32, device=self.device)
        start, ran = time.perf_counter(), 0
        for prefix in prefixes:
            blocks = -(-(prefix + chunk) // bs)
            if blocks > self.num_blocks or not cudnn_prompt.eligible(q, mc.num_kv_heads, bs, 1, self.dtype, prefix):
                break
            self.ops.prefill_attention(
                q, kv.k[0], kv.v[0], torch.tensor([0, chunk], **i32), torch.tensor([prefix + chunk], **i32),
                torch.arange(blocks, **i32)[None], mc.head_dim**-0.5, cached_prefix=prefix, **kv.layer_scales(0),
            )  # fmt: skip
            if not cudnn_prompt.planned(self.device, prefix, chunk):  # it fell back to Triton (cuDNN raised or
                break  # memory ran out): the rest would too
            ran += 1
        if ran and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if ran:
            log.info("cuDNN attention planned for %d prompt chunks of %d tokens in %.2f s", ran, chunk,
                     time.perf_counter() - start)  # fmt: skip

    # Requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        req_id: int,
        prompt_ids,
        params: SamplingParams,
        *,
        session_id: str | None = None,
        cache_namespace: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queues one sequence; raises ValueError for an empty or too-long prompt, or bad token ids."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if prompt.size >= self.max_model_len:
            raise ValueError(
                f"the prompt has {prompt.size} tokens; max_model_len is {self.max_model_len} "
                f"(prompt + at least one generated token must fit)"
            )
        room = self.max_model_len - prompt.size
        max_new = min(params.max_tokens or room, room)
        eos = -1 if not self.eos_token_ids else self.eos_token_ids[0]
        stops = list(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops += list(self.eos_token_ids[1:])
        stop_ids = tuple(stops) + (() if params.ignore_eos or eos < 0 else (eos,))
        now = self.clock.now() if arrival_time is None else arrival_time
        self.scheduler.add_request(
            req_id,
            prompt.astype(np.int32),
            max_new_tokens=max_new,
            stop_token_ids=stops,
            eos_token_id=eos,
            ignore_eos=params.ignore_eos,
            arrival_time=now,
            session_id=session_id,
            priority=priority,
            cache_namespace=cache_namespace,
        )
        # only once the scheduler took it (it refuses bad ids, duplicates, ...): nothing to undo otherwise
        self.runner.add_sequence(
            req_id,
            SequenceState(
                params, prompt.tolist(), [], make_generator(params.seed, self.device), stop_ids, max_new_tokens=max_new
            ),
        )

    def abort(self, req_id: int) -> Finished | None:
        """Ends a request now; returns its Finished (reason "abort"), or None if it is not running here
        (never added, finished or aborted already)."""
        if req_id not in self.runner.seqs:
            return None
        info = self.scheduler.request_info(req_id)
        self.scheduler.abort(req_id, self.clock.now())
        self.runner.remove_sequence(req_id)
        return Finished(
            req_id, "abort", None, info["num_prompt_tokens"], info["num_cached_tokens"], len(info["output_token_ids"])
        )

    def end_session(self, session_id: str) -> int:
        """Releases the session's retention pins; returns how many blocks it still pinned."""
        return self.scheduler.end_session(session_id, self.clock.now())

    def stats(self) -> cp.Stats:
        """The scheduler's counters and gauges."""
        return self.scheduler.stats()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # The loop ----------------------------------------------------------------------------------
    def step(self, idle_advance: float = 1e-3) -> StepOutput:
        """One loop step; an empty plan (e.g. waiting on pinned KV) moves a manual clock by `idle_advance`."""
        result = cp.loop_step(self.scheduler, self.runner, self.clock, idle_advance=idle_advance)
        if self.lookahead is not None:  # between steps: a snapshot here, the candidates' runs on its thread
            self.lookahead.on_step(self.scheduler, self.clock.now())
        self.drain_kv_events()
        if result.record is None:
            return StepOutput(np.empty(0, dtype=np.int64), result.tokens)
        plan = result.plan
        row = plan_features(plan)
        row.update(seconds=result.seconds, step_id=int(plan.step_id))
        self.profile.append(row)
        finished = [self._finished(f) for f in result.record.finished]
        host = self.runner.last_result  # beside the tokens: their logprobs, if any row asked
        logprobs = () if host is None else (host.logprobs, host.top_ids, host.top_logprobs)
        return StepOutput(
            self.runner.last_req_ids,
            np.asarray(result.tokens),
            finished,
            result.seconds,
            *(t if t is None else t.numpy() for t in logprobs),
        )

    def _finished(self, f) -> Finished:
        """A FinishedRequest of the scheduler in OpenAI's terms; the runner forgets it."""
        self.runner.remove_sequence(f.request_id)
        stop = f.output_token_ids[-1] if f.finish_reason == "stop" and f.num_output_tokens else None
        reason = "length" if f.finish_reason in ("length", "model_length") else "stop"
        return Finished(
            f.request_id,
            reason,
            stop,
            f.num_prompt_tokens,
            f.num_cached_tokens,
            f.num_output_tokens,
            f.first_scheduled_time - f.arrival_time,
        )

    def reset(self, scheduler_config: cp.SchedulerConfig | None = None, clock: cp.Clock | None = None) -> None:
        """Starts a new run on this warm engine (weights, KV tensors, graphs and compiled kernels kept):
        a fresh scheduler (of `scheduler_config`, e.g. other policies; default: the current one), no
        request, no overlap guess, no recorded profile, and `clock` (default: a new wall clock).

        Raises:
            ValueError: a config whose KV shape or block table differs from the one the runner was built for.
        """
        new = self.scheduler_config if scheduler_config is None else scheduler_config
        fixed = ("num_blocks", "block_size", "num_host_blocks", "max_num_seqs", "max_model_len", "vocab_size")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.scheduler_config, k)]
        if changed:
            raise ValueError(
                f"reset(): {changed} must stay as the engine was built "
                f"({ {k: getattr(self.scheduler_config, k) for k in changed} })"
            )
        if new.num_lookahead_tokens != self.scheduler_config.num_lookahead_tokens:
            raise ValueError(
                f"reset(): num_lookahead_tokens is {self.scheduler_config.num_lookahead_tokens} on this "
                f"engine (overlapped decode {'on' if self.overlap else 'off'})"
            )
        self.scheduler_config = new
        self.scheduler = cp.Scheduler(new)
        self._give_step_cost()
        self._start_lookahead()
        self._start_kv_events()
        self.runner.clear()
        self.clock = clock or cp.WallClock()
        self.profile = []

    def _start_lookahead(self) -> None:
        """A look-ahead controller (EngineConfig.lookahead) for the current scheduler, on a worker thread."""
        if self.lookahead is not None:
            self.lookahead.close()
            self.lookahead = None
        if self.config.lookahead is not None:
            from sim.lookahead import Lookahead, LookaheadConfig

            la = LookaheadConfig.from_dict(self.config.lookahead)
            self.lookahead = Lookahead(la, self.step_cost.native.with_own_counts(), threaded=True)

    def _give_step_cost(self) -> None:
        if self.step_cost is not None:
            self.scheduler.set_step_cost(self.step_cost.native)

    def keep_kv_events(self) -> None:
        """Records KV events into `kept_kv_events` too (besides any publisher), for a caller that forwards
        them itself: the data-parallel gateway's prefix shadow (docs/serving.md)."""
        self.kept_kv_events = []
        self.scheduler.record_kv_events()

    def drain_kv_events(self) -> None:
        """Moves what the scheduler recorded since the last drain to the publisher and `kept_kv_events`."""
        if self.kv_events is None and self.kept_kv_events is None:
            return
        events = self.scheduler.drain_kv_events()
        if self.kv_events is not None:
            self.kv_events.publish(events)
        if self.kept_kv_events is not None:
            self.kept_kv_events.extend(events)

    def _start_kv_events(self) -> None:
        """Has a new (empty) scheduler record KV events, and tells subscribers its cache starts empty."""
        if self.kv_events is not None or self.kept_kv_events is not None:
            self.scheduler.record_kv_events()
        if self.kv_events is not None:
            self.kv_events.publish([ALL_BLOCKS_CLEARED])
        if self.kept_kv_events is not None:
            self.kept_kv_events.append(ALL_BLOCKS_CLEARED)

    def close(self) -> None:
        """Stops publishing KV events (what is queued is sent first) and the other tensor-parallel ranks; without
        those ranks the engine can no longer step."""
        if self.tp is not None:
            self._tp_finalizer()
        if self.lookahead is not None:
            self.lookahead.close()
        if self.kv_events is not None:
            self.scheduler.record_kv_events(False)
            self.scheduler.drain_kv_events()
            self.kv_events.close()
            self.kv_events = None

    def save_profile(self, path: str, skip: int = 0) -> int:
        """Writes the recorded steps (after `skip` warm-up steps) as a profile CSV; returns the row count.

        Their seconds are the runner's (its forward pass and sampling), not the loop's period that
        `experiments.calibrate` measures (the host's planning and commit between steps included)."""
        rows = [{**row, "model": self.source, "device": str(self.device)} for row in self.profile[skip:]]
        graphs = self.runner.graphs
        meta = {
            "timing": "runner",
            "overlap": bool(self.overlap),
            "block_size": self.config.scheduler.block_size,
            "max_graph_batch": max(graphs.sizes, default=0) if graphs is not None else 0,
            "engine_shape": self.source,
            "device": str(self.device),
        }
        return write_profile(path, rows, meta)
