"""Tiny random models stepped directly through a ForwardContext, with any kernel set (no engine core).

Used where a test needs the model's own kernel path with a chosen backend: which ops a decode
step calls, and whether a fused op gives the logits of the ops it replaces. One prefill of every
prompt, then decode steps of all of them with each one's greedy token fed back; every decode
batch carries a padding row (slot -1, a one-token context in block 0), as CUDA-graph replays do.
"""

from __future__ import annotations

import torch

from engine_helpers import tiny_config


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu", **overrides):
    """A random-weight CausalLM of tiny_config's shape (norm weights near 1)."""
    from engine.loader.dummy import init_random
    from engine.models.decoder import CausalLM

    model = CausalLM(tiny_config(arch, **overrides)).to(device=device, dtype=dtype)
    init_random(model, seed, std=0.05)
    return model.eval()


class UnfusedRotaryWriteKV:
    """A kernel set whose rotary_write_kv (and a decode step's rotary_decode_attention) runs the ops it fuses,
    one by one: the model's former path."""

    def __init__(self, ops) -> None:
        self.ops = ops

    def __getattr__(self, name: str):
        return getattr(self.ops, name)

    def rotary_write_kv(
        self, positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, q_norm=None, k_norm=None, eps=1e-6
    ):
        if q_norm is not None:
            q = self.ops.rms_norm(q, q_norm, eps)
        if k_norm is not None:
            k = self.ops.rms_norm(k, k_norm, eps)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin)
        self.ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def rotary_decode_attention(self, *args, **kwargs):
        """A decode step's fused op as this set's rotary_write_kv, then decode_attention."""
        from engine.kernels.torch_ops import composed_rotary_decode_attention

        return composed_rotary_decode_attention(self.rotary_write_kv, self.ops.decode_attention)(*args, **kwargs)


class RecordingOps:
    """Wraps a kernel set; `calls` lists the operations called, in order."""

    def __init__(self, ops) -> None:
        self.ops, self.calls = ops, []

    def __getattr__(self, name: str):
        fn = getattr(self.ops, name)

        def call(*args, **kwargs):
            # `linear` is named with its prologue and whether a residual came with it: linear/norm+residual
            if name == "linear":
                prologue = kwargs.get("prologue", "none")
                plus = "+residual" if kwargs.get("residual") is not None else ""
                self.calls.append(f"linear/{prologue}{plus}")
            else:
                self.calls.append(name)
            return fn(*args, **kwargs)

        return call


def _to(meta, device):
    """The metadata's tensors on `device`."""
    from dataclasses import fields, replace

    return replace(
        meta,
        **{
            f.name: getattr(meta, f.name).to(device)
            for f in fields(meta)
            if isinstance(getattr(meta, f.name), torch.Tensor)
        },
    )


@torch.inference_mode()
def prefill_then_decode(
    model,
    ops,
    prompt_lens: list[int],
    steps: int,
    block_size: int = 8,
    seed: int = 0,
    on_step=None,
    pad_row: bool = True,
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits [R, V] of each step (the prefill's last tokens, then each decode) and the greedy tokens.

    `on_step(i)` is called before step i (0: the prefill), e.g. to reset a RecordingOps. `pad_row=False`:
    decode batches of the requests alone (a batch-1 CUDA graph's, one row for one request).
    """
    from engine.attention import AttentionMetadata, ForwardContext, KVCache
    from engine.models.decoder import rope_cos_sin

    c = model.config
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    gen = torch.Generator().manual_seed(seed)
    r = len(prompt_lens)
    width = -(-(max(prompt_lens) + steps) // block_size)
    num_blocks = r * width + 1  # block 0: the padding row's context
    table = (1 + torch.randperm(r * width, generator=gen)).view(r, width).to(torch.int32)
    shape = (c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    kv = KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    cos_sin = rope_cos_sin(c, 256).to(device)
    i32 = dict(dtype=torch.int32)

    def slot(req: int, pos: int) -> int:
        return int(table[req, pos // block_size]) * block_size + pos % block_size

    ids = [torch.randint(0, c.vocab_size, (n,), generator=gen) for n in prompt_lens]
    positions = torch.cat([torch.arange(n) for n in prompt_lens])
    qsl = torch.tensor([0] + prompt_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([slot(q, p) for q, n in enumerate(prompt_lens) for p in range(n)]),
        num_decode=0,
        decode_seq_lens=torch.zeros(0, **i32),
        decode_block_table=torch.zeros(0, width, **i32),
        prefill_query_start_loc=qsl,
        prefill_seq_lens=torch.tensor(prompt_lens, **i32),
        prefill_block_table=table,
        num_prefill_tokens=int(qsl[-1]),
    )
    if on_step:
        on_step(0)
    hidden = model(torch.cat(ids).to(device), positions.to(device), ForwardContext(ops, kv, _to(meta, device), cos_sin))
    all_logits = [model.compute_logits(hidden[qsl[1:].long().to(device) - 1])]
    tokens = [[int(t)] for t in all_logits[-1].argmax(-1)]
    lens = list(prompt_lens)
    pad_table = torch.zeros(1, width, **i32)
    pad = 1 if pad_row else 0
    for step in range(1, steps + 1):
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([slot(q, n) for q, n in enumerate(lens)] + [-1] * pad),
            num_decode=r + pad,
            decode_seq_lens=torch.tensor([n + 1 for n in lens] + [1] * pad, **i32),
            decode_block_table=torch.cat([table, pad_table[:pad]]),
            prefill_query_start_loc=torch.zeros(1, **i32),
            prefill_seq_lens=torch.zeros(0, **i32),
            prefill_block_table=table[:0],
            num_prefill_tokens=0,
        )
        if on_step:
            on_step(step)
        hidden = model(
            torch.tensor([t[-1] for t in tokens] + [0] * pad, device=device),
            torch.tensor(lens + [0] * pad, device=device),
            ForwardContext(ops, kv, _to(meta, device), cos_sin),
        )
        all_logits.append(model.compute_logits(hidden[:r]))
        for q, t in enumerate(all_logits[-1].argmax(-1).tolist()):
            tokens[q].append(t)
        lens = [n + 1 for n in lens]
    return all_logits, tokens
