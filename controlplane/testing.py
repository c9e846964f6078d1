"""A toy model that reads its context only through a plan's KV addressing.

`ToyModel` stands in for a GPU model runner in tests, the demo and the
simulator's parity checks. Its "KV cache" stores, for every slot, the token
and position written there. To sample, it gathers a request's whole context
through the block table, checks every position holds what it should, and
returns a token that is a hash of that context. So:

* a wrong block table, slot mapping, prefix hit or KV copy changes the
  tokens (or raises `KVCorruption`), and
* the tokens equal `reference_generate` whenever the plans are right,
  whatever batching, caching or preemption produced them.
"""

from __future__ import annotations

import numpy as np

from controlplane import _core

_MOD = (1 << 61) - 1


class KVCorruption(AssertionError):
    """The plan made the model read KV that was never written for that position."""


def next_token(context: np.ndarray, vocab_size: int, avoid: tuple[int, ...] = ()) -> int:
    """The toy model's greedy next token after `context` (a pure function of it)."""
    ctx = np.asarray(context, dtype=np.int64)
    idx = np.arange(1, ctx.size + 1, dtype=np.int64)
    h = int(((ctx + 7) * (idx * 2654435761 % 1000003)).sum() % _MOD)
    h = (h * 6364136223846793005 + ctx.size) % _MOD
    token = h % vocab_size
    while token in avoid:
        token = (token + 1) % vocab_size
    return int(token)


def reference_generate(prompt, max_new_tokens: int, vocab_size: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """What the toy model produces for `prompt` alone, with no scheduler in the way."""
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        t = next_token(np.asarray(seq), vocab_size, avoid)
        out.append(t)
        seq.append(t)
    return out


class ToyModel:
    """An executor over a fake paged KV cache (device and host tiers).

    Args:
        num_blocks, block_size, num_host_blocks: the cache shape the scheduler was given.
        vocab_size: token range.
        avoid: token ids never produced (e.g. an EOS the test does not want hit).
        step_cost: seconds reported per step, as `(fixed, per_token)`.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int,
        num_host_blocks: int = 0,
        avoid: tuple[int, ...] = (),
        step_cost: tuple[float, float] = (0.01, 0.0),
    ) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.avoid = tuple(avoid)
        self.step_cost = step_cost
        n, h = num_blocks * block_size, max(num_host_blocks, 1) * block_size
        self.dev_tok = np.full(n, -1, dtype=np.int64)
        self.dev_pos = np.full(n, -1, dtype=np.int64)
        self.host_tok = np.full(h, -1, dtype=np.int64)
        self.host_pos = np.full(h, -1, dtype=np.int64)
        self.tokens_computed = 0

    @classmethod
    def for_scheduler(cls, config, **kwargs) -> "ToyModel":
        return cls(config.num_blocks, config.block_size, config.vocab_size, config.num_host_blocks, **kwargs)

    def _copy_blocks(self, src_tok, src_pos, dst_tok, dst_pos, src: int, dst: int) -> None:
        bs = self.block_size
        dst_tok[dst * bs : (dst + 1) * bs] = src_tok[src * bs : (src + 1) * bs]
        dst_pos[dst * bs : (dst + 1) * bs] = src_pos[src * bs : (src + 1) * bs]

    def run(self, plan: _core.Plan) -> tuple[np.ndarray, float]:
        for op, src, dst in plan.kv_ops:
            if op == 0:
                self._copy_blocks(self.dev_tok, self.dev_pos, self.host_tok, self.host_pos, src, dst)
            else:
                self._copy_blocks(self.host_tok, self.host_pos, self.dev_tok, self.dev_pos, src, dst)
        slot_mapping = plan.slot_mapping
        self.dev_tok[slot_mapping] = plan.input_ids
        self.dev_pos[slot_mapping] = plan.positions
        self.tokens_computed += plan.num_tokens
        bs = self.block_size
        out = np.empty(plan.num_sampled, dtype=np.int64)
        sampled_rows = np.flatnonzero(plan.sample)
        for k, i in enumerate(sampled_rows):
            length = int(plan.cached_lens[i] + plan.query_lens[i])
            pos = np.arange(length)
            row = plan.block_table[plan.slots[i]]
            addr = row[pos // bs].astype(np.int64) * bs + pos % bs
            if (row[pos // bs] < 0).any() or not np.array_equal(self.dev_pos[addr], pos):
                raise KVCorruption(f"request {plan.req_ids[i]} reads KV not written for its positions")
            out[k] = next_token(self.dev_tok[addr], self.vocab_size, self.avoid)
        fixed, per_token = self.step_cost
        return out, fixed + per_token * plan.num_tokens
