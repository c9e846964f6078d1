"""The `jax` backend: every kernel operation but `write_kv` as a jitted XLA computation.

(`rotary_write_kv` is its rms_norm / rotary_embedding here, then torch's write_kv: see below.)

Torch tensors cross into JAX and back through DLPack, so nothing is copied, on a GPU
or on CPU, the KV cache included (that one is imported with copy=False: an error beats
a silent per-step copy). The exceptions are what DLPack cannot share: int64 metadata,
which JAX without x64 narrows to int32 (a small copy), and non-contiguous activations
(made contiguous first). The point is portability: any accelerator with an XLA backend
(ROCm, ...) runs the model.

    torch tensor --from_dlpack--> jax.Array --jit(op)--> jax.Array --torch.from_dlpack--> torch tensor
        (same memory)                         (new buffer)                (same memory)

Shapes are bucketed so that ragged batches do not recompile every step. jit
specialises on shapes; the sizes that change per step are padded up to the next
power of two (`bucket`) and the result is sliced back (a view, no copy):

    tokens T, requests R, sequences S    -> bucket(n)    padded with inert rows
    block-table width W                  -> bucket(W)    padded with -1 (masked)
    longest query of a prefill batch Q   -> bucket(Q)    (read on the host: one sync)

Model-fixed sizes (heads, head dim, hidden, vocab, cache blocks) and scalars (eps,
scale) are compiled in. Padding a tensor that is not already a bucket's size costs
one copy of that activation; a caller that pads to bucket sizes itself avoids it.

What falls back to the torch reference, and why:
    write_kv  JAX arrays are immutable. An XLA scatter into the cache returns a new
              cache; donating the DLPack-imported cache does not alias torch's
              memory (checked on jax 0.10: it copies and marks the input deleted),
              so a JAX write_kv would copy the whole cache on every call. The
              scatter is the whole op, so there is nothing left to compute in JAX:
              it is left unregistered and the registry picks torch's index_copy_.
    rotary_write_kv  for the same reason not one XLA computation: the (q/k norm and) rotary
              run here, the rotated k and v go into the cache through torch's write_kv;
              the same ops, in the same order, as the unfused path of this backend.
              So it takes FP8 caches as torch's write_kv does.

Attention (prefill and decode share one core): queries are laid out per request as
[R, Q, Hq, D]; the loop walks the block table CB blocks at a time, gathering those
blocks of every request, with an online (flash) softmax in float32. The trip count
is max(seq_lens) / (CB * block_size), so unused block-table columns cost nothing::

    block_table[r] = [ 7   2 | 9   4 | -1  -1 | -1  -1 ]     W bucketed to 8, CB = 2
                      chunk 0  chunk 1  not visited: max(seq_lens) <= 4 blocks

FP8 KV caches (float8_e4m3fn through DLPack, scales [NB, BS, Hk] float32; torch_ops' contract):
the gathered blocks are converted to q's dtype (exact) and the scales applied to the score and
probability columns, as the Triton kernels do.
"""

from __future__ import annotations

import os
from functools import partial

# JAX grabs 75% of a GPU's memory at start-up by default, which would starve torch's
# KV cache on the same device; allocate on demand unless the user said otherwise.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (ImportError here tells the registry the backend is unavailable)
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from jax import dlpack, lax  # noqa: E402

from engine.kernels import torch_ops  # noqa: E402
from engine.kernels.registry import register, register_probe  # noqa: E402

_PLATFORMS = {"cpu": "cpu", "cuda": "gpu"}
# Elements of one attention loop step's largest intermediate (the gathered keys or
# the score tile): bounds a step's memory. Read at each call (tests shrink it to
# exercise many chunks on small inputs).
_CHUNK_ELEMENTS = 1 << 24


def _probe(device_type: str) -> bool:
    """True when JAX has a device of that type ("cuda" means any JAX GPU: CUDA or ROCm)."""
    platform = _PLATFORMS.get(device_type)
    if platform is None:
        return False
    try:
        return len(jax.devices(platform)) > 0
    except (RuntimeError, ValueError):  # no backend for that platform in this jaxlib
        return False


register_probe("jax", _probe)


def bucket(n: int, floor: int = 8) -> int:
    """Smallest power of two >= max(n, floor): the padded size jit compiles for."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


# ---------------------------------------------------------------- torch <-> jax


def _to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX view of `t` (shared memory where DLPack allows; int64 narrows to int32)."""
    return dlpack.from_dlpack(t if t.is_contiguous() else t.contiguous())


def _cache_to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX view of a KV cache; raises rather than silently copying the whole cache."""
    if not t.is_contiguous():
        raise ValueError("the jax backend needs contiguous KV caches (a view would be copied)")
    return dlpack.from_dlpack(t, copy=False)


def _index_to_jax(t: torch.Tensor) -> jax.Array:
    """Integer metadata as int32 (JAX runs without x64)."""
    return _to_jax(t if t.dtype == torch.int32 else t.to(torch.int32))


def _to_torch(a: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(a)


def _pad(t: torch.Tensor, shape: tuple[int, ...], value: float | int | bool = 0) -> torch.Tensor:
    """`t` in the top-left corner of a `shape` tensor filled with `value` (`t` itself if it fits)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_full(shape, value)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _pad_rows(t: torch.Tensor, rows: int, value: float | int | bool = 0) -> torch.Tensor:
    return _pad(t, (rows, *t.shape[1:]), value)


# ---------------------------------------------------------------- elementwise ops


def _rms(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


_rms_jit = jax.jit(_rms, static_argnames="eps")


@partial(jax.jit, static_argnames="eps")
def _add_rms_jit(x: jax.Array, residual: jax.Array, weight: jax.Array, eps: float):
    summed = x + residual
    return _rms(summed, weight, eps), summed


@register("rms_norm", "jax")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, returned in x's dtype (see torch_ops.rms_norm)."""
    t = x.shape[0]
    y = _rms_jit(_to_jax(_pad_rows(x, bucket(t))), _to_jax(weight), eps=float(eps))
    return _to_torch(y)[:t]


@register("add_rms_norm", "jax")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) (see torch_ops.add_rms_norm)."""
    t, tb = x.shape[0], bucket(x.shape[0])
    y, summed = _add_rms_jit(
        _to_jax(_pad_rows(x, tb)), _to_jax(_pad_rows(residual, tb)), _to_jax(weight), eps=float(eps)
    )
    return _to_torch(y)[:t], _to_torch(summed)[:t]


@jax.jit
def _rotary_jit(positions: jax.Array, q: jax.Array, k: jax.Array, cos_sin: jax.Array):
    half = cos_sin.shape[1] // 2
    cs = cos_sin[positions].astype(jnp.float32)
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        x1, x2 = xf[..., :half], xf[..., half:]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return rotated.astype(x.dtype)

    return rot(q), rot(k)


@register("rotary_embedding", "jax")
def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding; new (q, k) in the inputs' dtypes (see torch_ops)."""
    t, tb = q.shape[0], bucket(q.shape[0])
    qr, kr = _rotary_jit(
        _index_to_jax(_pad_rows(positions, tb)), _to_jax(_pad_rows(q, tb)), _to_jax(_pad_rows(k, tb)), _to_jax(cos_sin)
    )
    return _to_torch(qr)[:t], _to_torch(kr)[:t]


@register("rotary_write_kv", "jax")
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
    """[q/k RMSNorm,] rotary in JAX, then k and v stored by torch's write_kv; returns the rotated q."""
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    q, k = rotary_embedding(positions, q, k, cos_sin)
    torch_ops.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@jax.jit
def _silu_and_mul_jit(x: jax.Array) -> jax.Array:
    gate, up = jnp.split(x, 2, axis=-1)
    # like torch: silu in float32 rounded to x's dtype, then the product in x's dtype
    return jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up


@register("silu_and_mul", "jax")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    t = x.shape[0]
    return _to_torch(_silu_and_mul_jit(_to_jax(_pad_rows(x, bucket(t)))))[:t]


# the product itself stays torch's (cuBLAS, or engine.quant's FP8 paths); its prologue runs in JAX
linear = register("linear", "jax")(torch_ops.composed_linear(rms_norm, add_rms_norm, silu_and_mul))


# ---------------------------------------------------------------- paged attention


def _chunk_blocks(r: int, q: int, hq: int, hk: int, d: int, bs: int, width: int, budget: int) -> int:
    """Blocks per loop step: a power of two <= width keeping a step's tensors under `budget`."""
    per_token = max(r * hk * d, r * hq * q)
    cb = 1
    while cb * 2 <= width and cb * 2 * bs * per_token <= budget:
        cb *= 2
    return cb


def _paged_attention(
    q: jax.Array,
    qpos: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    blocks: jax.Array,
    scale: float,
    chunk_elements: int,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Flash-style attention of per-request queries over their paged contexts.

    Args:
        q: [R, Q, Hq, D]; qpos: [R, Q] position of each query (-1: padding, sees nothing);
        k_cache, v_cache: [NB, BS, Hk, D]; blocks: [R, W] block ids (< 0 past the end);
        chunk_elements: memory budget of one loop step, in elements.
        k_scale, v_scale: [NB, BS, Hk] float32 with FP8 caches, else None.
    Returns:
        [R, Q, Hq, D] float32; a query that sees no key gets zeros.
    """
    r, nq, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    width, group = blocks.shape[1], hq // hk
    cb = _chunk_blocks(r, nq, hq, hk, d, bs, width, chunk_elements)
    ct = cb * bs
    exact = q.dtype == jnp.float32
    # float32 inputs: true float32 matmuls (no TF32); bf16/fp16: native inputs, which
    # multiply exactly, accumulated in float32; probabilities meet V in the input dtype.
    precision = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
    qg = q.reshape(r, nq, hk, group, d)
    blocks = jnp.maximum(blocks, 0)
    # a key at position p is visible to a query at qpos iff p <= qpos (p < seq_len follows)
    n_chunks = jnp.minimum((jnp.max(qpos) + ct) // ct, width // cb)

    fp8 = k_scale is not None

    def columns(scales, blk):  # [NB, BS, Hk] -> the chunk's [R, Hk, 1, 1, CT], to scale score columns
        return scales[blk].reshape(r, ct, hk).transpose(0, 2, 1)[:, :, None, None, :]

    def step(c, state):
        m, l, acc = state
        blk = lax.dynamic_slice_in_dim(blocks, c * cb, cb, axis=1)
        k = k_cache[blk].reshape(r, ct, hk, d)
        v = v_cache[blk].reshape(r, ct, hk, d)
        if fp8:  # e4m3 -> q's dtype is exact; the scales go on the columns
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = jnp.einsum("rqhgd,rkhd->rhgqk", qg, k, precision=precision, preferred_element_type=jnp.float32) * scale
        if fp8:
            s = s * columns(k_scale, blk)
        kpos = c * ct + jnp.arange(ct)
        visible = (kpos[None, None, :] <= qpos[:, :, None])[:, None, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # all masked so far: avoid inf - inf
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pw = p * columns(v_scale, blk) if fp8 else p  # l sums the unscaled p
        pv = jnp.einsum(
            "rhgqk,rkhd->rhgqd", pw.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
        )
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    m0 = jnp.full((r, hk, group, nq), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((r, hk, group, nq), jnp.float32)
    acc0 = jnp.zeros((r, hk, group, nq, d), jnp.float32)
    _, l, acc = lax.fori_loop(0, n_chunks, step, (m0, l0, acc0))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(r, nq, hq, d)


@partial(jax.jit, static_argnames=("max_q", "scale", "chunk_elements"))
def _prefill_jit(
    q,
    k_cache,
    v_cache,
    query_start_loc,
    seq_lens,
    block_table,
    k_scale,
    v_scale,
    *,
    max_q: int,
    scale: float,
    chunk_elements: int,
):
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    qlen = ends - starts
    i = jnp.arange(max_q)
    valid = i[None, :] < qlen[:, None]  # [R, Q]
    qpos = jnp.where(valid, seq_lens[:, None] - qlen[:, None] + i[None, :], -1)
    tok = jnp.where(valid, starts[:, None] + i[None, :], 0)
    out = _paged_attention(q[tok], qpos, k_cache, v_cache, block_table, scale, chunk_elements, k_scale, v_scale)
    # back to packed order: token t belongs to the first request whose end is past t
    t = jnp.arange(q.shape[0])
    req = jnp.minimum(jnp.searchsorted(ends, t, side="right"), ends.shape[0] - 1)
    slot = jnp.clip(t - starts[req], 0, max_q - 1)
    return out[req, slot].astype(q.dtype)


def _scales_to_jax(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[jax.Array | None, jax.Array | None]:
    """An FP8 cache's scales as JAX views (contract checked), or (None, None)."""
    if not torch_ops.check_kv_scales(k_cache, k_scale, v_scale):
        return None, None
    return _cache_to_jax(k_scale), _cache_to_jax(v_scale)


@register("prefill_attention", "jax")
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
    """Causal paged attention of packed queries, cached prefix included (see torch_ops).

    Reads the longest query length on the host (one sync) to size the query bucket.
    """
    scales = _scales_to_jax(k_cache, k_scale, v_scale)
    t, r = q.shape[0], seq_lens.shape[0]
    if t == 0 or r == 0:
        return torch.empty_like(q)
    tb, rb, wb = bucket(t), bucket(r), bucket(block_table.shape[1])
    max_q = bucket(int((query_start_loc[1:] - query_start_loc[:-1]).max()), floor=1)
    # padded requests repeat the last start: zero query tokens, zero context
    qsl = _pad_rows(query_start_loc, rb + 1, 0)
    qsl[r + 1 :] = query_start_loc[-1]
    out = _prefill_jit(
        _to_jax(_pad_rows(q, tb)),
        _cache_to_jax(k_cache),
        _cache_to_jax(v_cache),
        _index_to_jax(qsl),
        _index_to_jax(_pad_rows(seq_lens, rb)),
        _index_to_jax(_pad(block_table, (rb, wb), -1)),
        *scales,
        max_q=max_q,
        scale=float(scale),
        chunk_elements=_CHUNK_ELEMENTS,
    )
    return _to_torch(out)[:t]


@partial(jax.jit, static_argnames=("scale", "chunk_elements"))
def _decode_jit(q, k_cache, v_cache, seq_lens, block_table, k_scale, v_scale, *, scale: float, chunk_elements: int):
    qpos = (seq_lens - 1)[:, None]
    out = _paged_attention(q[:, None], qpos, k_cache, v_cache, block_table, scale, chunk_elements, k_scale, v_scale)
    return out[:, 0].astype(q.dtype)


@register("decode_attention", "jax")
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
    """One query token per request over its whole paged context (see torch_ops)."""
    scales = _scales_to_jax(k_cache, k_scale, v_scale)
    b = q.shape[0]
    if b == 0:
        return torch.empty_like(q)
    bb, wb = bucket(b), bucket(block_table.shape[1])
    # padded requests have seq_len 0: their query sits at -1 and sees nothing
    out = _decode_jit(
        _to_jax(_pad_rows(q, bb)),
        _cache_to_jax(k_cache),
        _cache_to_jax(v_cache),
        _index_to_jax(_pad_rows(seq_lens, bb)),
        _index_to_jax(_pad(block_table, (bb, wb), -1)),
        *scales,
        scale=float(scale),
        chunk_elements=_CHUNK_ELEMENTS,
    )
    return _to_torch(out)[:b]


# rotary_write_kv (JAX, the write torch's) then JAX's decode attention
rotary_decode_attention = register("rotary_decode_attention", "jax")(
    torch_ops.composed_rotary_decode_attention(rotary_write_kv, decode_attention)
)


# ---------------------------------------------------------------- sampling


@jax.jit
def _penalties_jit(logits, seen, output_counts, repetition, presence, frequency):
    rep = repetition[:, None]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    counts = output_counts.astype(logits.dtype)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0).astype(logits.dtype)


@register("apply_penalties", "jax")
def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Repetition / presence / frequency penalties on float32 logits [S, V] (see torch_ops)."""
    s, sb = logits.shape[0], bucket(logits.shape[0], floor=1)
    out = _penalties_jit(
        _to_jax(_pad_rows(logits, sb)),
        _to_jax(_pad_rows(seen, sb, False)),
        _index_to_jax(_pad_rows(output_counts, sb)),
        _to_jax(_pad_rows(repetition, sb, 1.0)),
        _to_jax(_pad_rows(presence, sb)),
        _to_jax(_pad_rows(frequency, sb)),
    )
    return _to_torch(out)[:s]


@jax.jit
def _top_k_top_p_min_p_jit(logits, top_k, top_p, min_p):
    s, vocab = logits.shape
    order = jnp.argsort(-logits, axis=-1)  # descending; stable, so ties keep index order
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    ranks = jnp.arange(vocab)[None, :]
    drop = ranks >= k[:, None]
    probs = jax.nn.softmax(jnp.where(drop, -jnp.inf, sorted_logits), axis=-1)
    # nucleus: drop a token when the mass before it already reaches top_p (the top token always stays).
    # top_p = 1 is off outright: XLA's cumsum rounds in another order than torch's and can reach 1.0
    # before the tail, which would drop the last tokens of an unfiltered row.
    before = jnp.cumsum(probs, axis=-1) - probs
    nucleus = (before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop = drop | nucleus | (probs < min_p[:, None] * probs[:, :1])
    drop = drop.at[:, 0].set(False)
    masked = jnp.where(drop, -jnp.inf, sorted_logits)
    return jnp.zeros_like(logits).at[jnp.arange(s)[:, None], order].set(masked)


@register("top_k_top_p_min_p", "jax")
def top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Sets logits outside each row's top-k / top-p / min-p sets to -inf (see torch_ops)."""
    s, sb = logits.shape[0], bucket(logits.shape[0], floor=1)
    out = _top_k_top_p_min_p_jit(
        _to_jax(_pad_rows(logits, sb)),
        _index_to_jax(_pad_rows(top_k, sb)),
        _to_jax(_pad_rows(top_p, sb, 1.0)),
        _to_jax(_pad_rows(min_p, sb)),
    )
    return _to_torch(out)[:s]


def compiled_shapes() -> int | None:
    """How many shape specialisations the jitted kernels hold, None if this jax cannot say.

    Tests check the bucketing with it; it relies on jit's private `_cache_size`.
    """
    fns = (
        _rms_jit,
        _add_rms_jit,
        _rotary_jit,
        _silu_and_mul_jit,
        _prefill_jit,
        _decode_jit,
        _penalties_jit,
        _top_k_top_p_min_p_jit,
    )
    if not all(hasattr(fn, "_cache_size") for fn in fns):
        return None
    return sum(fn._cache_size() for fn in fns)
