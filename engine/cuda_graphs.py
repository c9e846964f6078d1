"""CUDA graphs for pure-decode batches: one graph per captured batch size, shared memory pool.

A decode batch of n requests replays the graph of the smallest captured size
b >= n. Inputs live in static buffers; rows n..b are padding: token 0 at
position 0, slot -1 (its k/v is not stored), a context of one token in block 0.

    static: ids[B]  pos[B]  slots[B]  seq_lens[B]  block_table[B, max_blocks_per_seq]  ->  logits[B, V]

A step's inputs travel in one contiguous int32 staging buffer, [ids | pos | slots | seq_lens | the
b x W block-table columns of its width bucket W], with one host->device copy; the graph itself
begins by unpacking it into the static tensors. (Two strided copies straight into the static
tensors cost ~0.12 ms of host time a step on an H200, with the GPU waiting.)

Only the columns a step needs are copied into block_table; the attention
kernel reads no column past ceil(seq_len / block_size). Graphs are captured
per (batch size, block-table width bucket): the split-KV decode kernel sizes
its grid from the table's width, so a 500-token context must not replay the
graph captured for 128K tokens (its 66 mostly idle splits a layer cost ~10 us).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import AttentionMetadata, ForwardContext


def width_buckets(max_blocks: int) -> list[int]:
    """Block-table widths to capture: 64, 512, 4096 blocks (1K, 8K, 64K tokens of 16), then the maximum."""
    return sorted({min(w, max_blocks) for w in (64, 512, 4096)} | {max_blocks})


class DecodeGraphs:
    def __init__(self, runner, batch_sizes: list[int]) -> None:
        self.runner = runner
        self.sizes = sorted(set(batch_sizes))
        dev = runner.device
        bmax = self.sizes[-1] if self.sizes else 0
        # ids, positions, slots, seq_lens: one int64 buffer, so one host->device copy a step
        self.inputs = torch.zeros(4, bmax, dtype=torch.int64, device=dev)
        self.ids, self.pos, self.slots, self.seq_lens = self.inputs
        self.slots.fill_(-1)
        self.seq_lens.fill_(1)
        self.block_table = torch.zeros(bmax, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        stage = 4 * bmax + bmax * runner.max_blocks_per_seq
        # two pinned buffers, alternating: a step and its overlapped successor are staged back to back
        self.host_stages = [torch.zeros(stage, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.copied = [torch.cuda.Event(), torch.cuda.Event()]  # the last copy out of each
        self.turn = 0
        self.dev_stage = torch.zeros(stage, dtype=torch.int32, device=dev)
        self.logits = None
        self.widths = width_buckets(runner.max_blocks_per_seq)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.last_key: tuple[int, int] | None = None
        self.pool = None
        if self.sizes:
            self.capture()

    def can_run(self, n: int) -> bool:
        return bool(self.sizes) and n <= self.sizes[-1]

    def _unpack(self, b: int, width: int) -> None:
        """Staging buffer -> static inputs (captured at the head of each graph)."""
        self.inputs[:, :b].copy_(self.dev_stage[: 4 * b].view(4, b))
        self.block_table[:b, :width].copy_(self.dev_stage[4 * b : 4 * b + b * width].view(b, width))

    def _forward(self, b: int, width: int) -> torch.Tensor:
        r = self.runner
        empty = self.seq_lens[:0]
        meta = AttentionMetadata(
            slot_mapping=self.slots[:b],
            num_decode=b,
            decode_seq_lens=self.seq_lens[:b],
            decode_block_table=self.block_table[:b, :width],
            prefill_query_start_loc=empty,
            prefill_seq_lens=empty,
            prefill_block_table=self.block_table[:0],
            num_prefill_tokens=0,
        )
        ctx = ForwardContext(r.ops, r.kv, meta, r.cos_sin)
        hidden = r.model(self.ids[:b], self.pos[:b], ctx)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        bmax = self.sizes[-1]
        vocab = self.runner.model.config.vocab_size
        self.logits = torch.zeros(bmax, vocab, dtype=torch.float32, device=self.runner.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for width in self.widths:  # warm up: compilation, lazy initialisation, allocator
                self._unpack(bmax, width)
                self.logits[:bmax].copy_(self._forward(bmax, width))
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            for width in reversed(self.widths):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._unpack(b, width)
                    self.logits[:b].copy_(self._forward(b, width))
                self.graphs[(b, width)] = graph
        torch.cuda.synchronize()

    def run(self, batch, plan, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Replays the graph for `batch`; `ids_dev` (device, [n]) replaces its input ids."""
        n = len(batch.input_ids)
        b = next(s for s in self.sizes if s >= n)
        r = self.runner
        width = max(1, -(-int(batch.seq_lens.max()) // r.block_size))
        bucket = next(w for w in self.widths if w >= width)
        total = 4 * b + b * bucket
        self.turn ^= 1
        host_stage, copied = self.host_stages[self.turn], self.copied[self.turn]
        copied.synchronize()  # the copy of two steps ago may still be reading this pinned buffer
        stage = host_stage.numpy()
        host = stage[: 4 * b].reshape(4, b)
        host[0, :n], host[1, :n], host[2, :n], host[3, :n] = (
            batch.input_ids,
            batch.positions,
            batch.slot_mapping,
            batch.seq_lens,
        )
        host[:, n:b] = ((0,), (0,), (-1,), (1,))  # padding rows: no KV write, a one-token context
        table = stage[4 * b : total].reshape(b, bucket)
        # the bucket's columns; those past a request's own blocks are never read
        table[:n] = np.asarray(plan.block_table)[batch.block_rows, :bucket]
        table[n:] = 0
        self.dev_stage[:total].copy_(host_stage[:total], non_blocking=True)
        copied.record()
        if ids_dev is not None:  # an overlapped step's tokens come from the previous step, on the device
            self.dev_stage[:n].copy_(ids_dev)
        key = (b, bucket)
        self.last_key = key
        self.graphs[key].replay()
        rows = batch.logits_rows
        if len(rows) == n and (rows == np.arange(n)).all():
            return self.logits[:n]
        return self.logits.index_select(0, torch.from_numpy(rows.astype(np.int64)).to(r.device, non_blocking=True))
