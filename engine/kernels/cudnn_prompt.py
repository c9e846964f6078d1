"""Long prefill chunks of one request through cuDNN's fused attention (torch's SDPA cuDNN backend).

Triton's prefill kernel is the engine's paged prefill attention; on an H100 cuDNN's fused attention runs
long causal chunks faster (docs/perf.md: 619 against 501 TFLOP/s on a 50K prompt). Its causal mask is
aligned to the top left (query i sees keys j <= i), the engine's bottom-right mask only where the queries
are the whole context. So a chunk of n new tokens on P cached ones is two cuDNN calls merged by their
log-sum-exps::

    queries [P, P + n)  x  keys [0, P)       unmasked  (the cached prefix: every query sees all of it)
    queries [P, P + n)  x  keys [P, P + n)   causal    (the chunk's own keys: top left is right here)

The Triton prefill op sends here one request's chunk of at least MIN_TOKENS tokens whose cached prefix P
the caller states (`cached_prefix`, known on the host; the engine's runner states it only for a step that
is that chunk alone, so no decode ever waits on a cuDNN plan) and is a multiple of PAD: a first turn's
chunks (the scheduler cuts whole chunks, so every P is a multiple of its chunk size); every other launch
stays on Triton's kernel. Only on the cards where it was measured faster than Triton's kernel (CARDS:
Hopper, H100 and H200) and where torch's cuDNN is enabled (torch.backends.cudnn.enabled).

cuDNN plans (builds and compiles) a graph for each new shape, 50-190 ms on an H100, which an engine would
meet at every prompt length: n is rounded up to a multiple of PAD (padded queries sit after the real ones,
a real query never sees a padded key under the causal mask, and their rows are dropped), and P is taken
only as a multiple of PAD, so the plans are few and reused; the engine runs a lone prompt's chunks once at
start (warm_up_prefixes, EngineCore). K/V come from the paged cache through the
Triton module's contiguous copy (gathered_context, or the dequantized copy of an FP8 cache), zero past
the chunk.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

ENABLED = True  # route long chunks of one request to cuDNN (off: Triton's kernel for all)
MIN_TOKENS = 4096
PAD = 1024  # chunk lengths rounded up to, and cached prefixes taken at, multiples of this
# the K/V copy it reads, at most (Triton's gathered copy has the same limit: attention.PREFILL_GATHER_BYTES,
# which the engine's memory sizing reserves)
COPY_BYTES = 512 << 20

# SM versions where the route was measured faster than Triton's kernel (docs/perf.md: H100; the route's GPU
# tests on H100 and H200); elsewhere (Ampere, Ada, Blackwell) Triton's kernel until measured
CARDS = (90,)

_broken: set[torch.device] = set()  # devices where cuDNN's attention raised once: Triton from then on
_planned: set[tuple[torch.device, int, int]] = set()  # (device, prefix, padded chunk) cuDNN has run


def _key(device: torch.device) -> torch.device:
    """The device with its index ("cuda" and "cuda:0" are one card, not equal as torch.device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on(sm_version: int) -> bool:
    """Whether the route runs on a card of this SM version: switched on, measured there, torch's cuDNN there
    and enabled (what the engine's memory reserve counts it by too)."""
    return ENABLED and sm_version in CARDS and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled


def usable(device: torch.device) -> bool:
    """A CUDA device the route is on() for where cuDNN's attention has not failed."""
    return device.type == "cuda" and _key(device) not in _broken and on(sm(device))


def sm(device: torch.device) -> int:
    """The device's SM version (90 for Hopper)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def planned(device: torch.device, prefix: int, tokens: int) -> bool:
    """Whether cuDNN has run a chunk of `tokens` on `prefix` cached tokens on this device (its graphs are
    planned: the same shape again costs no planning)."""
    return (_key(device), prefix, padded(tokens)) in _planned


def padded(tokens: int) -> int:
    return -(-tokens // PAD) * PAD


def warm_up_prefixes(chunk: int, max_len: int, hk: int, d: int, dtype: torch.dtype) -> list[int]:
    """The cached prefixes (0, chunk, 2 chunk, ...) on which a lone long prompt's `chunk`-token chunks take the
    route, below max_len: what an engine runs once at start so that cuDNN plans their graphs (and Triton
    compiles the copy) then, not in the first requests. Empty where such chunks do not take it."""
    if not (ENABLED and chunk >= MIN_TOKENS and chunk % PAD == 0 and dtype in (torch.bfloat16, torch.float16)):
        return []
    if d not in (64, 128):
        return []
    prefixes = range(0, max_len - chunk, chunk)  # a prompt is shorter than max_len: its chunks end below it
    return [p for p in prefixes if copy_bytes(p, chunk, hk, d, dtype) <= COPY_BYTES]


def copy_bytes(prefix: int, tokens: int, hk: int, d: int, dtype: torch.dtype) -> int:
    """Bytes of the K/V copy prompt_attention reads for `tokens` new tokens on `prefix` cached ones."""
    return 2 * (prefix + padded(tokens)) * hk * d * dtype.itemsize


def extra_bytes(tokens: int, hq: int, d: int, dtype: torch.dtype) -> int:
    """What a chunk of `tokens` with a cached prefix holds beyond the same chunk without one (whose forward an
    engine's memory profile runs): the second partial and the merged output."""
    return 2 * padded(tokens) * hq * d * dtype.itemsize


def eligible(q: torch.Tensor, hk: int, bs: int, reqs: int, compute: torch.dtype, cached_prefix: int | None) -> bool:
    """Whether prompt_attention takes this launch: one request with a stated cached prefix that is a multiple of
    PAD, a chunk of at least MIN_TOKENS, a K/V copy of at most COPY_BYTES (blocks of `bs` slots, a power of two
    as the copy kernel takes), 16-bit compute, a head size cuDNN's fused attention takes, a device it is usable
    on."""
    return (
        ENABLED
        and cached_prefix is not None
        and bs & (bs - 1) == 0
        and cached_prefix % PAD == 0
        and reqs == 1
        and q.shape[0] >= MIN_TOKENS
        and compute in (torch.bfloat16, torch.float16)
        and q.shape[2] in (64, 128)
        and copy_bytes(cached_prefix, q.shape[0], hk, q.shape[2], compute) <= COPY_BYTES
        and usable(q.device)
    )


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's attention, causal from the top left or unmasked: [1, H, S, D] views in (K/V may have fewer heads
    than q: GQA); out [1, Hq, S, D] and the rows' log-sum-exps (natural log, float32, Hq * S of them)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[
        :2
    ]
    return out, lse


@triton.jit
def _merge_kernel(a_ptr, b_ptr, la_ptr, lb_ptr, o_ptr, a_st0, a_st1, b_st0, b_st1, o_st0, o_st1, S, D: tl.constexpr):
    """Row (token t, head h) of two attention partials over disjoint keys, merged by their natural log-sum-exps
    (la, lb [H, S] contiguous): out = (a e^la + b e^lb) / (e^la + e^lb)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, D)
    la = tl.load(la_ptr + h * S + t)
    lb = tl.load(lb_ptr + h * S + t)
    top = tl.maximum(la, lb)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    a = tl.load(a_ptr + t * a_st0 + h * a_st1 + d).to(tl.float32)
    b = tl.load(b_ptr + t * b_st0 + h * b_st1 + d).to(tl.float32)
    out = (a * wa + b * wb) / (wa + wb)
    tl.store(o_ptr + t * o_st0 + h * o_st1 + d, out.to(o_ptr.dtype.element_ty))


def merge(a: torch.Tensor, lse_a: torch.Tensor, b: torch.Tensor, lse_b: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` rows of two partials a, b [S, H, D] (any strides, D contiguous) merged: [tokens, H, D]."""
    rows, h, d = a.shape
    out = torch.empty((tokens, h, d), dtype=a.dtype, device=a.device)
    la, lb = (x.reshape(h, rows).contiguous() for x in (lse_a, lse_b))
    _merge_kernel[(tokens, h)](a, b, la, lb, out, *a.stride()[:2], *b.stride()[:2], *out.stride()[:2], rows, D=d)
    return out


def prompt_attention(q: torch.Tensor, copy_context, scale: float, prefix: int) -> torch.Tensor | None:
    """Causal attention of one request's chunk q [T, Hq, D] on `prefix` cached tokens; None where cuDNN raised
    (the caller runs its own kernel; this device is not tried again) or memory ran out (the caller's kernel
    this time; its own copy may fit where this one's did not).

    copy_context(rows): (k, v) contiguous [rows, Hk, D] copies of the request's K/V in q's dtype, rows >=
    prefix + T, zero past it."""
    tokens, hq, d = q.shape
    rows = padded(tokens)
    # [1, H, rows, D] views of [rows, H, D] rows (the layout cuDNN calls BSHD), GQA heads as they are
    as_bhsd = lambda t: t.permute(1, 0, 2).unsqueeze(0)  # noqa: E731
    as_rows = lambda t: t[0].permute(1, 0, 2)  # noqa: E731 - and back
    try:  # memory running out anywhere in the route: the caller's kernel this time, the route stays
        k, v = copy_context(prefix + rows)
        q_pad = q.new_empty((rows, hq, d))
        q_pad[:tokens].copy_(q)
        q_pad[tokens:].zero_()
        try:
            own, own_lse = attend(as_bhsd(q_pad), as_bhsd(k[prefix:]), as_bhsd(v[prefix:]), scale, True)
            if prefix:
                cached, cached_lse = attend(as_bhsd(q_pad), as_bhsd(k[:prefix]), as_bhsd(v[:prefix]), scale, False)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as exc:  # this cuDNN or card lacks the fused attention
            _broken.add(_key(q.device))
            log.warning("cuDNN attention unavailable on %s (%s); prefill uses the Triton kernel", q.device, exc)
            return None
        if prefix:
            del k, v, q_pad  # the merge's output in their place
            out = merge(as_rows(own), own_lse, as_rows(cached), cached_lse, tokens)
        else:
            out = as_rows(own)[:tokens].contiguous()
    except torch.OutOfMemoryError:
        log.warning("cuDNN attention ran out of memory on %d tokens; the Triton prefill kernel runs them", tokens)
        return None
    _planned.add((_key(q.device), prefix, rows))
    return out
