"""Overlapped decode: the next decode step is on the GPU before this step's tokens reach the host.

    run(plan N):   launch N  ->  launch a *guess* of plan N+1 (same requests, one token further,
                   its input ids taken on the device from N's sampled tokens)  ->  wait for N's tokens
    commit(N), plan N+1 = step(now)        (the GPU is already computing the guess)
    run(plan N+1): the guess matches -> its tokens are N+1's tokens; launch a guess of N+2; wait
                   otherwise         -> drop the guess (its random draws undone), run plan N+1 as usual

The scheduler still decides everything. A guess is made only where dropping it is safe: pure decodes
that sample, no penalties, each next position in a block the request already owns (the scheduler's
`num_lookahead_tokens = 1`); why that suffices, and what it costs: docs/engine.md#overlapped-decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling import SampleResult, SequenceState


@dataclass
class Guess:
    """A launched guess of the next decode step: its rows and the results still on their way."""

    req_ids: np.ndarray  # [n] int64, rows in batch order
    positions: np.ndarray  # [n] int32
    slot_mapping: np.ndarray  # [n] int32
    block_rows: np.ndarray  # [n] rows of the scheduler's block table
    table: np.ndarray  # [n, width] the block-table columns it read (a row reads its first `used`)
    used: np.ndarray  # [n, width] bool: columns row k's attention reads
    seqs: list[SequenceState]
    device: SampleResult  # on the device
    host: SampleResult  # pinned host copies, valid once `ready` has fired
    ready: torch.cuda.Event | None
    saved_states: list[tuple[torch.Generator, torch.Tensor]]
    batch_free: bool  # every row greedy or seeded: a subset of the rows keeps its results

    def match(self, plan) -> np.ndarray | None:
        """Indices of plan's rows among the guessed ones if the guess computed exactly plan's step, else None."""
        n = plan.num_reqs
        if n == 0 or plan.num_tokens != n or not np.asarray(plan.sample).all():
            return None
        req_ids = np.asarray(plan.req_ids)
        if n == len(self.req_ids) and (req_ids == self.req_ids).all():
            rows = np.arange(n)
        else:
            if not self.batch_free or n > len(self.req_ids):
                return None
            where = {int(r): k for k, r in enumerate(self.req_ids.tolist())}
            found = [where.get(int(r), -1) for r in req_ids.tolist()]
            rows = np.asarray(found, dtype=np.int64)
            if (rows < 0).any():
                return None
        if not (np.asarray(plan.positions) == self.positions[rows]).all():
            return None
        if not (np.asarray(plan.slot_mapping) == self.slot_mapping[rows]).all():
            return None
        slots = np.asarray(plan.slots)
        if not (slots == self.block_rows[rows]).all():
            return None
        width = self.table.shape[1]
        same = np.asarray(plan.block_table)[slots, :width] == self.table[rows]
        if not (same | ~self.used[rows]).all():
            return None
        return rows

    def drop(self) -> None:
        """Undoes the guess's random draws (its K/V writes need no undoing, see the module docstring)."""
        for generator, state in self.saved_states:
            generator.set_state(state)

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def to_host(result: SampleResult, device: torch.device) -> tuple[SampleResult, torch.cuda.Event | None]:
    """Non-blocking copies of a device SampleResult into pinned host tensors, and the event after them."""
    if device.type != "cuda":
        return result, None

    def copy(t):
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    host = SampleResult(copy(result.tokens), copy(result.logprobs), copy(result.top_ids), copy(result.top_logprobs))
    event = torch.cuda.Event()
    event.record()
    return host, event


def select(result: SampleResult, rows: np.ndarray, device: torch.device | None = None) -> SampleResult:
    """The rows `rows` of a SampleResult on the host, or on `device`."""
    idx = torch.from_numpy(rows)
    if device is not None:
        idx = idx.to(device, non_blocking=True)

    def pick(t):
        return None if t is None else t.index_select(0, idx)

    return SampleResult(pick(result.tokens), pick(result.logprobs), pick(result.top_ids), pick(result.top_logprobs))


@dataclass
class NextStep:
    """The guessed next decode step's inputs, in the runner's HostBatch terms."""

    keep: np.ndarray  # indices of this step's rows that continue
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray
    block_rows: np.ndarray
    req_ids: np.ndarray


def predict_next(batch, plan, seqs: list[SequenceState], block_size: int) -> NextStep | None:
    """The next decode step if every request of this all-decode `batch` goes on, or None if no safe guess.

    `seqs` are the batch's rows' states before this step's tokens are appended.
    """
    n = len(batch.input_ids)
    if n == 0 or batch.num_decode != n or len(batch.sampled_req_ids) != n:
        return None
    if any(s.params.needs_penalties for s in seqs):
        return None
    # a request whose token of this step is its last (max_tokens) is not in the next step
    keep = np.asarray([s.max_new_tokens is None or len(s.output_ids) + 1 < s.max_new_tokens for s in seqs])
    if not keep.any():
        return None
    keep = np.flatnonzero(keep)
    pos = batch.positions[keep].astype(np.int64) + 1
    rows = np.asarray(batch.block_rows)[keep]
    table = np.asarray(plan.block_table)
    if (pos // block_size >= table.shape[1]).any():
        return None
    blocks = table[rows, pos // block_size]
    if (blocks < 0).any():  # the next position's block is not the request's own yet
        return None
    return NextStep(
        keep=keep,
        positions=pos.astype(np.int32),
        slot_mapping=(blocks.astype(np.int64) * block_size + pos % block_size).astype(np.int32),
        seq_lens=(batch.seq_lens[keep] + 1).astype(np.int32),
        block_rows=rows,
        req_ids=np.asarray(batch.sampled_req_ids)[keep],
    )
