"""The model runner: a Plan in, one sampled token per sampling request out.

    plan --(numpy, decode rows first)--> one pinned int32 staging buffer --H2D--> device views
         --> KV copies (swap) --> forward (eager, or a CUDA graph for pure-decode batches)
         --> logits of the sampled rows --> Sampler --> tokens (host)

No Python loop touches tokens: the batch is reordered and gathered with numpy
index arithmetic, and all integer inputs travel in a single non-blocking copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, ForwardContext, KVCache
from engine.cuda_graphs import DecodeGraphs
from engine.models.decoder import rope_cos_sin
from engine.overlap import Guess, predict_next, select, to_host
from engine.sampling import SampleResult, Sampler, SequenceState


@dataclass
class HostBatch:
    """A plan reordered decodes-first, as numpy arrays (all int32)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    num_decode: int
    seq_lens: np.ndarray  # [R] in the new order
    query_start_loc: np.ndarray  # [R+1] in the new order
    block_rows: np.ndarray  # [R] rows of the scheduler's block table, new order
    logits_rows: np.ndarray  # [S] token index (new order) of each sampled request, in plan order
    sampled_req_ids: np.ndarray  # [S] in plan order


def reorder_decodes_first(plan) -> HostBatch:
    """Reorders a plan's requests (one-token requests first) and its tokens to match."""
    ql = np.asarray(plan.query_lens, dtype=np.int64)
    cl = np.asarray(plan.cached_lens, dtype=np.int64)
    if plan.num_tokens == plan.num_reqs:  # all decodes: already in order, one token per request
        return _all_decode_batch(plan, cl)
    qsl = np.asarray(plan.query_start_loc, dtype=np.int64)
    is_dec = ql == 1
    order = np.concatenate([np.flatnonzero(is_dec), np.flatnonzero(~is_dec)])
    lens = ql[order]
    new_qsl = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_qsl[1:])
    total = int(new_qsl[-1])
    # token k of the new order comes from plan token  qsl[order[r]] + (k - new_qsl[r])
    tok_idx = np.repeat(qsl[:-1][order] - new_qsl[:-1], lens) + np.arange(total)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    sampled = np.flatnonzero(np.asarray(plan.sample))
    logits_rows = new_qsl[inv[sampled]] + ql[sampled] - 1
    return HostBatch(
        input_ids=np.asarray(plan.input_ids)[tok_idx].astype(np.int32, copy=False),
        positions=np.asarray(plan.positions)[tok_idx].astype(np.int32, copy=False),
        slot_mapping=np.asarray(plan.slot_mapping)[tok_idx].astype(np.int32),
        num_decode=int(is_dec.sum()),
        seq_lens=(cl + ql)[order].astype(np.int32),
        query_start_loc=new_qsl.astype(np.int32),
        block_rows=np.asarray(plan.slots)[order],
        logits_rows=logits_rows.astype(np.int32),
        sampled_req_ids=np.asarray(plan.req_ids)[sampled],
    )


def _all_decode_batch(plan, cached_lens: np.ndarray) -> HostBatch:
    n = plan.num_reqs
    sample = np.asarray(plan.sample)
    rows = np.arange(n, dtype=np.int32)
    return HostBatch(
        input_ids=np.asarray(plan.input_ids, dtype=np.int32),
        positions=np.asarray(plan.positions, dtype=np.int32),
        slot_mapping=np.asarray(plan.slot_mapping).astype(np.int32),
        num_decode=n,
        seq_lens=(cached_lens + 1).astype(np.int32),
        query_start_loc=np.arange(n + 1, dtype=np.int32),
        block_rows=np.asarray(plan.slots),
        logits_rows=rows if sample.all() else rows[sample],
        sampled_req_ids=np.asarray(plan.req_ids) if sample.all() else np.asarray(plan.req_ids)[sample],
    )


def table_rows(batch: HostBatch, plan, block_size: int) -> np.ndarray:
    """The batch's rows of the plan's block table, as wide as its longest context in blocks."""
    width = max(1, -(-int(batch.seq_lens.max()) // block_size))
    return np.asarray(plan.block_table)[batch.block_rows, :width]


class ModelRunner:
    """Owns the KV cache tensors, turns plans into forward passes and samples.

    Args:
        model: an engine CausalLM on `device`.
        ops: the KernelSet (chosen by the caller for `device`).
        num_blocks, block_size, num_host_blocks: the KV cache the scheduler manages.
        max_model_len: positions the rotary table covers.
        max_num_seqs, max_blocks_per_seq: the scheduler's block-table shape.
        graph_batch_sizes: decode batch sizes to capture as CUDA graphs (empty: eager only).
        overlap: launch each decode step's guessed successor before waiting for its tokens; needs
            the scheduler's num_lookahead_tokens = 1 to guess across block boundaries.
        kv_dtype: the KV cache's element type (default: `dtype`); float8_e4m3fn adds per-slot,
            per-head float32 scales (engine.attention.KVCache), on the device and the host tier.
    """

    def __init__(
        self,
        model,
        ops,
        device: torch.device,
        dtype: torch.dtype,
        *,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int,
        max_model_len: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        seed: int = 0,
        graph_batch_sizes: tuple[int, ...] = (),
        overlap: bool = False,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        c = model.config
        self.model, self.ops, self.device, self.dtype = model, ops, device, dtype
        self.kv_dtype = kv_dtype = dtype if kv_dtype is None else kv_dtype
        heads = (c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv = KVCache.allocate(*heads, dtype=kv_dtype, device=device)
        pin = device.type == "cuda"
        self.host_kv = KVCache.allocate(
            c.num_layers, max(num_host_blocks, 0), *heads[2:], dtype=kv_dtype, pin_memory=pin
        )
        self.block_size = block_size
        self.cos_sin = rope_cos_sin(c, max_model_len).to(device)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.seqs: dict[int, SequenceState] = {}
        self.sampler = Sampler(ops, device, seed)
        self.last_result: SampleResult | None = None
        self.last_req_ids: np.ndarray = np.empty(0, dtype=np.int64)
        self._staging = torch.empty(1 << 16, dtype=torch.int32, pin_memory=pin)
        self._staged = torch.cuda.Event() if pin else None  # the last copy out of the staging buffer
        self.overlap = overlap  # launch a guess of the next decode step before waiting (engine/overlap.py)
        self.guess: Guess | None = None
        self.num_guesses_used = self.num_guesses_dropped = 0
        self._last_end: float | None = None  # when the last step's tokens were back
        self.graphs = None
        self.tp = None  # rank 0 of a tensor-parallel group: sends each step to the other ranks (engine.tensor_parallel)
        if graph_batch_sizes and device.type == "cuda":
            self.graphs = DecodeGraphs(self, sorted(b for b in graph_batch_sizes if b <= max_num_seqs))

    # Requests ----------------------------------------------------------------------------------
    def add_sequence(self, req_id: int, seq: SequenceState) -> None:
        self.seqs[req_id] = seq

    def remove_sequence(self, req_id: int) -> None:
        self.seqs.pop(req_id, None)

    def clear(self) -> None:
        """Forgets every request, any guess in flight and the last step's results (KV tensors, graphs kept)."""
        if self.guess is not None:
            self.guess.wait()
        self.guess, self.last_result, self._last_end = None, None, None
        self.seqs.clear()

    # One step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan) -> tuple[np.ndarray, float]:
        """Executes one plan; returns the sampled tokens (plan order) and the step's wall seconds.

        With overlap on, the plan may already be on the GPU as the previous step's guess
        (engine/overlap.py); either way a guess of the next step is launched before this
        step's tokens are waited for.
        """
        start = time.perf_counter()
        if self.tp is not None:  # the other ranks run the same KV copies and forward, in step with this one
            self.tp.send_step(plan, self.block_size)
        guess, self.guess = self.guess, None
        rows = guess.match(plan) if guess is not None else None
        if guess is not None and rows is None:
            guess.drop()
            self.num_guesses_dropped += 1
        if len(plan.kv_ops):  # with a guess in use: swap-outs of requests it no longer has, after it in stream order
            self.copy_blocks(np.asarray(plan.kv_ops))
        if rows is not None:  # the GPU has been computing this step since the last one ended
            self.num_guesses_used += 1
            batch = reorder_decodes_first(plan)
            seqs = [self.seqs[int(r)] for r in batch.sampled_req_ids]
            identity = len(rows) == len(guess.req_ids)
            device = guess.device if identity else select(guess.device, rows, self.device)
            self._launch_guess(batch, plan, seqs, device.tokens)
            guess.wait()
            host = guess.host if identity else select(guess.host, rows)
        else:
            if plan.num_tokens == 0:  # KV copies only
                self.last_result, self.last_req_ids = None, np.empty(0, dtype=np.int64)
                return np.empty(0, dtype=np.int64), time.perf_counter() - start
            batch = reorder_decodes_first(plan)
            logits = self.forward(batch, plan)
            seqs = [self.seqs[int(r)] for r in batch.sampled_req_ids]
            if not seqs:  # a prefill chunk that samples nothing: still time the whole step
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.last_result, self.last_req_ids = None, batch.sampled_req_ids
                return np.empty(0, dtype=np.int64), time.perf_counter() - start
            result = self.sampler(logits, seqs)
            host, ready = to_host(result, self.device)
            self._launch_guess(batch, plan, seqs, result.tokens)
            if ready is not None:
                ready.synchronize()
        tokens = host.tokens.numpy()
        for seq, token in zip(seqs, tokens.tolist()):
            seq.output_ids.append(token)
        self.last_result, self.last_req_ids = host, batch.sampled_req_ids
        end = time.perf_counter()
        # A step served by a guess began on the GPU when the previous one ended, not when run() was
        # called: its cost is the time since the previous step's tokens were back (the host's commit
        # and planning in between ran while the GPU computed it).
        seconds = end - (self._last_end if rows is not None and self._last_end is not None else start)
        self._last_end = end
        return tokens, seconds

    def _launch_guess(self, batch: HostBatch, plan, seqs: list[SequenceState], tokens: torch.Tensor) -> None:
        """Launches the guessed next decode step (engine/overlap.py) if overlap is on and a guess is safe."""
        if not self.overlap:
            return
        nxt = predict_next(batch, plan, seqs, self.block_size)
        if nxt is None:
            return
        n = len(nxt.keep)
        if self.graphs is not None and not self.graphs.can_run(n):
            return  # too large for a graph: an eager guess would cost the host more than it hides
        kept = seqs if n == len(seqs) else [seqs[k] for k in nxt.keep.tolist()]
        if n == len(seqs):
            ids = tokens
        else:
            ids = tokens.index_select(0, torch.from_numpy(nxt.keep).to(self.device, non_blocking=True))
        guess_batch = HostBatch(
            input_ids=np.zeros(n, dtype=np.int32),
            positions=nxt.positions,
            slot_mapping=nxt.slot_mapping,
            num_decode=n,
            seq_lens=nxt.seq_lens,
            query_start_loc=np.arange(n + 1, dtype=np.int32),
            block_rows=nxt.block_rows,
            logits_rows=np.arange(n, dtype=np.int32),
            sampled_req_ids=nxt.req_ids,
        )
        saved = []
        if not all(s.params.greedy for s in kept):  # the draws a dropped guess must give back
            saved.append((self.sampler.generator, self.sampler.generator.get_state()))
            saved += [(s.generator, s.generator.get_state()) for s in kept if s.generator is not None]
        logits = self.forward(guess_batch, plan, ids_dev=ids)
        result = self.sampler(logits, kept, pending=1)
        host, ready = to_host(result, self.device)
        width = max(1, -(-int(nxt.seq_lens.max()) // self.block_size))
        table = np.asarray(plan.block_table)[nxt.block_rows, :width].copy()
        used = np.arange(width) < (-(-nxt.seq_lens // self.block_size))[:, None]
        self.guess = Guess(
            nxt.req_ids,
            nxt.positions,
            nxt.slot_mapping,
            nxt.block_rows,
            table,
            used,
            kept,
            result,
            host,
            ready,
            saved,
            all(s.params.greedy or s.generator is not None for s in kept),
        )

    def forward(self, batch: HostBatch, plan, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [S, V] of the sampled rows (plan order); `ids_dev` replaces the input ids (device)."""
        n = len(batch.input_ids)
        if self.graphs is not None and batch.num_decode == n and self.graphs.can_run(n):
            return self.graphs.run(batch, plan, ids_dev)
        return self.forward_rows(batch, table_rows(batch, plan, self.block_size), ids_dev)

    def forward_rows(self, batch: HostBatch, rows: np.ndarray, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """forward() given the batch's rows of the block table (table_rows): a tensor-parallel rank's step."""
        ids, pos, slots, meta = self.upload(batch, rows)
        if ids_dev is not None:
            ids.copy_(ids_dev)
        ctx = ForwardContext(self.ops, self.kv, meta, self.cos_sin)
        hidden = self.model(ids, pos, ctx)
        rows = torch.from_numpy(batch.logits_rows).to(self.device, non_blocking=True).long()
        return self.model.compute_logits(hidden.index_select(0, rows))

    def upload(self, batch: HostBatch, rows: np.ndarray):
        """One staging copy of every integer input (`rows`: table_rows); returns device ids, positions, slots
        and metadata."""
        nd, r = batch.num_decode, len(batch.seq_lens)
        width = rows.shape[1]
        parts = [
            batch.input_ids,
            batch.positions,
            batch.slot_mapping,
            batch.seq_lens,
            batch.query_start_loc[nd:] - batch.query_start_loc[nd],
            rows.reshape(-1),
        ]
        sizes = [p.size for p in parts]
        total = sum(sizes)
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy may still be reading the buffer
        if total > self._staging.numel():
            self._staging = torch.empty(total * 2, dtype=torch.int32, pin_memory=self._staging.is_pinned())
        host = self._staging[:total].numpy()
        np.concatenate(parts, out=host, casting="unsafe")
        dev = self._staging[:total].to(self.device, non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        ids, pos, slots, seq_lens, qsl, flat_rows = dev.split(sizes)
        blocks = flat_rows.view(r, width)
        # the prefills' table as wide as their own longest context (a decode's may be far longer): Triton's
        # prefill sizes its splits and its context copy from the table's width
        pwidth = max(1, -(-int(batch.seq_lens[nd:].max()) // self.block_size)) if r > nd else width
        meta = AttentionMetadata(
            slot_mapping=slots.long(),
            num_decode=nd,
            decode_seq_lens=seq_lens[:nd],
            decode_block_table=blocks[:nd],
            prefill_query_start_loc=qsl,
            prefill_seq_lens=seq_lens[nd:],
            prefill_block_table=blocks[nd:, :pwidth],
            num_prefill_tokens=len(batch.input_ids) - nd,
            prefill_cached_prefix=int(batch.seq_lens[0] - batch.query_start_loc[1]) if r == 1 and nd == 0 else None,
        )
        return ids, pos, slots, meta

    def copy_blocks(self, ops: np.ndarray) -> None:
        """Runs the plan's KV copies in order; consecutive copies of one direction go together.

        A block is its slice of every KV tensor: k, v and, for an FP8 cache, their scales (FP8
        values are copied as bytes).
        """
        pairs = [(_bytes(d), _bytes(h)) for d, h in zip(self.kv.tensors(), self.host_kv.tensors())]
        start = 0
        while start < len(ops):
            end = start
            while end < len(ops) and ops[end, 0] == ops[start, 0]:
                end += 1
            src = torch.from_numpy(ops[start:end, 1].astype(np.int64))
            dst = torch.from_numpy(ops[start:end, 2].astype(np.int64))
            if ops[start, 0] == 0:  # device -> host
                for dev_t, host_t in pairs:
                    host_t[:, dst] = dev_t[:, src.to(self.device)].cpu()
            else:  # host -> device
                for dev_t, host_t in pairs:
                    dev_t[:, dst.to(self.device)] = host_t[:, src].to(self.device, non_blocking=True)
            start = end


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes (indexed copies of float8 are not on every device); others as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
