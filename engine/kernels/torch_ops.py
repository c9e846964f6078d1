"""The torch reference of every kernel operation: the contract other backends are tested against.

Paged KV layout (one pair of tensors per layer)::

    k_cache, v_cache : [num_blocks, block_size, num_kv_heads, head_dim]
    token at position p of a request lives at
        block_table[r, p // block_size] * block_size + p % block_size     (its "slot")

Attention metadata, for R requests whose query tokens are packed back to back::

    query_start_loc [R+1]  q tokens of request r are q[query_start_loc[r]:query_start_loc[r+1]]
    seq_lens        [R]    context length after this step (cached + query)
    block_table     [R, W] block ids, -1 past the end

Query token i of request r sits at position seq_lens[r] - q_len_r + i and attends
causally to keys [0, that position]. All of them, the new ones included, are
read back from the paged cache, so `write_kv` (in a model, `rotary_write_kv`) runs first.

FP8 KV cache (docs/fp8.md): caches of dtype float8_e4m3fn (KV_FP8) come with float32 scales, one
per (slot, KV head), addressed like the cache without its head dim::

    k_scale, v_scale : [num_blocks, block_size, num_kv_heads] float32
    stored   k_cache[slot, h] = fp8(clamp(k / k_scale[slot, h], -448, 448))   (round to nearest even)
    read     k = k_cache[slot, h].float() * k_scale[slot, h]

The KV writes quantize (`quantize_fp8`: scale = max|x| over the head dim / 448, per token and head,
computed from the value rounded to its own dtype as the unquantized write would store it; an
all-zero head gets scale 1); the attention ops dequantize. Every op that reads or writes a cache
takes `k_scale=None, v_scale=None`: required with FP8 caches, refused with others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import quant
from engine.kernels.registry import register, register_probe

register_probe("torch", lambda device_type: True)

KV_FP8 = torch.float8_e4m3fn  # the FP8 KV cache's element type
FP8_MAX = 448.0  # its largest finite value
REFERENCE_SCORES = 1 << 28  # prefill_attention's float32 scores at once (1 GiB), in pieces of query rows


def check_kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether the caches are FP8; raises ValueError when the scales do not go with them."""
    fp8 = k_cache.dtype == KV_FP8
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 KV cache needs its k_scale and v_scale")
    if not fp8 and (k_scale is not None or v_scale is not None):
        raise ValueError(f"k_scale/v_scale go with FP8 KV caches only, not {k_cache.dtype}")
    if fp8 and (
        k_scale.shape != k_cache.shape[:3]
        or v_scale.shape != k_cache.shape[:3]
        or k_scale.dtype != torch.float32
        or v_scale.dtype != torch.float32
    ):
        raise ValueError(
            f"KV scales must be float32 {tuple(k_cache.shape[:3])}, got "
            f"{k_scale.dtype} {tuple(k_scale.shape)} and {v_scale.dtype} {tuple(v_scale.shape)}"
        )
    return fp8


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn values [..., D], float32 scales [...]): one scale per row of D.

    scale = max|x| / 448 (IEEE float32 division), 1 for an all-zero row; value = x / scale rounded
    to nearest even, clamped to +-448 first. The Triton writes compute exactly this.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # amax / a tensor, not / a Python float: CUDA divides by a scalar as a multiply by its reciprocal,
    # which is 1 ulp off IEEE division for some values; the Triton writes divide exactly (div_rn).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    values = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8)
    return values, scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values [..., D] of FP8 `values` with their per-row `scale` [...]."""
    return values.float() * scale[..., None]


@register("rms_norm", "torch")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@register("add_rms_norm", "torch")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


@register("rotary_embedding", "torch")
def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX / Hugging Face Llama) rotary embedding.

    Args:
        positions: [T] int.
        q: [T, Hq, D]; k: [T, Hk, D].
        cos_sin: [max_pos, D] float32, cos in the first D/2 columns, sin in the rest.
    Returns:
        Rotated (q, k), new tensors in the inputs' dtypes.
    """
    half = cos_sin.shape[1] // 2
    cs = cos_sin.index_select(0, positions.long())
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


@register("silu_and_mul", "torch")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def composed_linear(rms_norm_op, add_rms_norm_op, silu_and_mul_op):
    """The `linear` op from a backend's rms_norm, add_rms_norm and silu_and_mul: the prologue, then the
    product (F.linear, or engine.quant.fp8_linear for FP8 weights). Backends whose prologue ops are
    their own compose with this where they have no fused kernel."""

    def linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
        *,
        prologue: str = "none",
        norm_weight: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        eps: float = 0.0,
    ):
        """x W^T (+ bias) with the input first through a prologue; fused into one kernel where a backend can
        (the one-row decode GEMV: engine/kernels/triton/gemv.py).

        Args:
            x: [T, K], or [T, 2K] for prologue "silu".
            weight: [N, K] in x's dtype, or float8_e4m3fn with weight_scale [N] float32 (engine.quant).
            prologue: "none"; "norm": the input is rms_norm(x + residual) * norm_weight (residual None: of
                x alone); "silu": the input is silu(x[:, :K]) * x[:, K:].
        Returns:
            y [T, N] in x's dtype; for "norm" the pair (y, x + residual) (x itself without a residual), as
            add_rms_norm returns the new residual stream.
        """
        new_residual = None
        if prologue == "norm":
            if residual is None:
                x, new_residual = rms_norm_op(x, norm_weight, eps), x
            else:
                x, new_residual = add_rms_norm_op(x, residual, norm_weight, eps)
        elif prologue == "silu":
            x = silu_and_mul_op(x)
        elif prologue != "none":
            raise ValueError(f"prologue must be none, norm or silu, got {prologue!r}")
        if weight_scale is not None:
            y = quant.fp8_linear(x, weight, weight_scale, bias)
        else:
            y = F.linear(x, weight, bias)
        return (y, new_residual) if prologue == "norm" else y

    return linear


linear = register("linear", "torch")(composed_linear(rms_norm, add_rms_norm, silu_and_mul))


@register("write_kv", "torch")
def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores each token's key and value at its slot (in place); slots < 0 are skipped.

    k, v: [T, Hk, D]; caches [NB, BS, Hk, D]. FP8 caches: each (token, head) quantized by
    `quantize_fp8`, its scale stored at the same slot of k_scale / v_scale [NB, BS, Hk].
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    nb, bs = k_cache.shape[:2]
    kc, vc = k_cache.view(nb * bs, *k_cache.shape[2:]), v_cache.view(nb * bs, *v_cache.shape[2:])
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if fp8:
        (k8, ks), (v8, vs) = quantize_fp8(k), quantize_fp8(v)
        # index_copy_ has no float8 kernel on every device: copy the bytes
        kc.view(torch.uint8).index_copy_(0, slots, k8.view(torch.uint8))
        vc.view(torch.uint8).index_copy_(0, slots, v8.view(torch.uint8))
        k_scale.view(nb * bs, -1).index_copy_(0, slots, ks)
        v_scale.view(nb * bs, -1).index_copy_(0, slots, vs)
        return
    kc.index_copy_(0, slots, k.to(kc.dtype))
    vc.index_copy_(0, slots, v.to(vc.dtype))


@register("rotary_write_kv", "torch")
def rotary_write_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer's step before attention: rotary on q and k, then k and v into the paged cache.

    Exactly ``rotary_embedding`` followed by ``write_kv`` (a backend fuses them into one kernel and
    must round where they do), preceded, for Qwen3's per-head norms, by ``rms_norm`` of q over
    each head with `q_norm` [D] and of k with `k_norm` [D] (its output rounded to the input's
    dtype before the rotary).

    Args:
        positions: [T] int.  q: [T, Hq, D]; k, v: [T, Hk, D]; any strides (views of a qkv output).
        cos_sin: [max_pos, D] float32 (see rotary_embedding).
        k_cache, v_cache: [NB, BS, Hk, D], written in place.  slot_mapping: [T], slots < 0 skipped.
        q_norm, k_norm: optional RMSNorm weights [D]; eps: their epsilon.
        k_scale, v_scale: [NB, BS, Hk] float32 with FP8 caches (see write_kv), else None.
    Returns:
        The rotated q, a new [T, Hq, D] tensor in q's dtype.
    """
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    q, k = rotary_embedding(positions, q, k, cos_sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def _gather_context(
    cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """[length, H, D] float32 of one request's context, read through its block row (FP8: dequantized)."""
    bs = cache.shape[1]
    nblk = -(-length // bs)
    idx = blocks[:nblk].long()
    if scale is None:
        return cache.index_select(0, idx).reshape(nblk * bs, *cache.shape[2:])[:length].float()
    values = cache.view(torch.uint8).index_select(0, idx).view(cache.dtype)
    return dequantize_fp8(values, scale.index_select(0, idx)).reshape(nblk * bs, *cache.shape[2:])[:length]


@register("prefill_attention", "torch")
def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    cached_prefix: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed query tokens over their paged contexts (cached prefix included).

    Args:
        q: [T, Hq, D]; k_cache, v_cache: [NB, BS, Hk, D]; query_start_loc: [R+1];
        seq_lens: [R]; block_table: [R, W]; scale: softmax scale.
        k_scale, v_scale: [NB, BS, Hk] float32 with FP8 caches (dequantized on read), else None.
        cached_prefix: with one request, the caller's word for its cached prefix (seq_len minus its
            query length, known on the host; None: not stated): a backend may take a faster route
            then; the result is the same.
    Returns:
        [T, Hq, D] in q's dtype.
    """
    check_kv_scales(k_cache, k_scale, v_scale)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    hq, hk = q.shape[1], k_cache.shape[2]
    for r, length in enumerate(lens):
        s, e = starts[r], starts[r + 1]
        if e == s:
            continue
        qlen = e - s
        k = _gather_context(k_cache, block_table[r], length, k_scale)
        v = _gather_context(v_cache, block_table[r], length, v_scale)
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)
        # Query rows in pieces so the float32 scores [Hq, rows, length] stay under ~1 GiB (a 4K turn on
        # a 100K prefix would need 52 GB at once); each row's result does not depend on the others.
        rows = max(1, REFERENCE_SCORES // (hq * length))
        for a in range(s, e, rows):
            b = min(e, a + rows)
            # query i is at position length - qlen + (i - s); key j is visible iff j <= that position
            qpos = torch.arange(length - qlen + (a - s), length - qlen + (b - s), device=q.device)[:, None]
            mask = torch.arange(length, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(
                q[a:b].float().transpose(0, 1), kt, vt, attn_mask=mask, scale=scale, enable_gqa=hq != hk
            )
            out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out


@register("decode_attention", "torch")
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per request (its last position) over its whole paged context.

    Args:
        q: [B, Hq, D]; k_cache, v_cache: [NB, BS, Hk, D]; seq_lens: [B] (>= 1);
        block_table: [B, W]; scale: softmax scale.
        k_scale, v_scale: [NB, BS, Hk] float32 with FP8 caches (dequantized on read), else None.
    Returns:
        [B, Hq, D] in q's dtype.
    """
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    b, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    width = block_table.shape[1]
    blocks = block_table.long().clamp(min=0)
    if fp8:
        k = dequantize_fp8(k_cache.view(torch.uint8)[blocks].view(KV_FP8), k_scale[blocks])
        v = dequantize_fp8(v_cache.view(torch.uint8)[blocks].view(KV_FP8), v_scale[blocks])
        k, v = k.reshape(b, width * bs, hk, d), v.reshape(b, width * bs, hk, d)
    else:
        k = k_cache[blocks].reshape(b, width * bs, hk, d).float()
        v = v_cache[blocks].reshape(b, width * bs, hk, d).float()
    group = hq // hk
    qf = q.float().view(b, hk, group, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qf, k) * scale
    valid = torch.arange(width * bs, device=q.device)[None, :] < seq_lens.long()[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)
    return out.reshape(b, hq, d).to(q.dtype)


def composed_rotary_decode_attention(rotary_write_kv_op, decode_attention_op):
    """The `rotary_decode_attention` op from a backend's rotary_write_kv and decode_attention (backends
    without a fused kernel compose with this)."""

    def rotary_decode_attention(
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        scale: float,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        eps: float = 1e-6,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A decode step's attention from its q/k/v projections: rotary_write_kv, then decode_attention.

        One query token per request, at its last position (positions[b] = seq_lens[b] - 1, slot_mapping[b]
        that position's slot in block_table, or -1 for a padding row); the arguments are the two ops'
        (q, k, v [B, H, D] may be strided views). Returns [B, Hq, D] in q's dtype; k and v land in the cache
        as rotary_write_kv stores them. Fused into one kernel where a backend can (triton: the rotary and
        the KV write run in the split-KV decode kernel; engine/kernels/triton/attention.py).
        """
        kv = {"k_scale": k_scale, "v_scale": v_scale} if k_scale is not None else {}
        q = rotary_write_kv_op(
            positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, q_norm=q_norm, k_norm=k_norm, eps=eps, **kv
        )
        return decode_attention_op(q, k_cache, v_cache, seq_lens, block_table, scale, **kv)

    return rotary_decode_attention


rotary_decode_attention = register("rotary_decode_attention", "torch")(
    composed_rotary_decode_attention(rotary_write_kv, decode_attention)
)


@register("apply_penalties", "torch")
def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalties as vLLM and OpenAI define them, on float32 logits [S, V].

    Args:
        seen: [S, V] bool, token appears in the prompt or the output (repetition penalty's scope).
        output_counts: [S, V] int, occurrences in the output so far (presence/frequency scope).
        repetition: [S] (1 = off): positive logits of seen tokens are divided by it, negative multiplied.
        presence: [S] (0 = off): subtracted once from every token already output.
        frequency: [S] (0 = off): subtracted once per occurrence in the output.
    """
    rep = repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency[:, None] * counts
    logits = logits - presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


@register("top_k_top_p_min_p", "torch")
def top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Sets logits outside each row's top-k, nucleus top-p and min-p sets to -inf.

    Args:
        logits: [S, V] float32 (already divided by temperature).
        top_k: [S] int, <= 0 or >= V means off.  top_p: [S] in (0, 1], 1 = off.
        min_p: [S] in [0, 1], 0 = off: keep tokens with prob >= min_p * max prob.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k).long()
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # nucleus: drop a token when the mass before it already reaches top_p (the top token always stays)
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)
