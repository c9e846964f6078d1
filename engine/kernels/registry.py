"""One registry of operations, many backends, chosen per operation with a fallback.

    registry.OPS["decode_attention"]        the contract (signature + docstring in torch_ops.py)
        |-- "torch"   reference, runs anywhere (CPU included)
        |-- "triton"  GPU kernels (CPU too under TRITON_INTERPRET=1, slowly)
        `-- "jax"     XLA through DLPack

A backend module registers its implementations with ``@register(op, backend)``
and a probe saying on which devices it can run. ``KernelSet`` resolves, once,
each operation to the first backend in its preference list that implements it
and can run on the device; the torch reference is always the last resort, so a
model never fails for want of a kernel. Which backend won is recorded
(``KernelSet.chosen``) so tests and benchmarks can say what they ran.

Every backend's KV ops (write_kv, rotary_write_kv, prefill_attention, decode_attention,
rotary_decode_attention) take FP8 caches: float8_e4m3fn caches with keyword scales k_scale, v_scale
[NB, BS, Hk] float32, quantized on write and dequantized on read (the contract: torch_ops; docs/fp8.md).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

OPS: tuple[str, ...] = (
    "rms_norm",  # (x[T,H], weight[H], eps) -> y
    "add_rms_norm",  # (x[T,H], residual[T,H], weight[H], eps) -> (y, x + residual)
    "rotary_embedding",  # (positions[T], q[T,Hq,D], k[T,Hk,D], cos_sin[P,D]) -> (q, k)
    "silu_and_mul",  # (x[T,2F]) -> silu(x[:, :F]) * x[:, F:]
    "linear",  # (x, weight[N,K], bias, weight_scale[, prologue, norm_weight, residual, eps]) -> x W^T + b, the
    #   input first through an RMSNorm (with the residual add) or SiLU-and-mul: see torch_ops.linear
    "write_kv",  # (k[T,Hk,D], v[T,Hk,D], k_cache, v_cache, slot_mapping[T][, k_scale, v_scale]) -> None,
    #   in place (FP8 caches: quantized, scales stored)
    "rotary_write_kv",  # (positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping[, q_norm, k_norm, eps,
    #   k_scale, v_scale]) -> rotated q; k rotated and v stored in the cache:
    #   rotary_embedding + write_kv
    "prefill_attention",  # paged, causal, with a cached prefix[, k_scale, v_scale]: see torch_ops.prefill_attention
    "decode_attention",  # paged, one query token per request[, k_scale, v_scale]: see torch_ops.decode_attention
    "rotary_decode_attention",  # (positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, seq_lens,
    #   block_table, scale[, q_norm, k_norm, eps, k_scale, v_scale]) -> [B, Hq, D]: rotary_write_kv +
    #   decode_attention, for a step of decode rows only (torch_ops.composed_rotary_decode_attention)
    "apply_penalties",  # repetition / presence / frequency penalties on logits
    "top_k_top_p_min_p",  # masks logits outside top-k / top-p / min-p with -inf
)

BACKENDS: tuple[str, ...] = ("torch", "triton", "jax")
_BACKEND_MODULES = {
    "torch": "engine.kernels.torch_ops",
    "triton": "engine.kernels.triton_ops",
    "jax": "engine.kernels.jax_ops",
}

_IMPLS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
_PROBES: dict[str, Callable[[str], bool]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` implements `op` for `backend`."""
    if op not in _IMPLS:
        raise ValueError(f"unknown kernel operation {op!r}; known: {list(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known: {list(BACKENDS)}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[op][backend] = fn
        return fn

    return wrap


def register_probe(backend: str, probe: Callable[[str], bool]) -> None:
    """`probe(device_type)` says whether `backend` can run on that device type ("cpu", "cuda")."""
    _PROBES[backend] = probe


def load_backend(backend: str) -> bool:
    """Imports a backend's module (registering its kernels); False if it cannot be imported here."""
    if backend not in _BACKEND_MODULES:
        raise ValueError(f"unknown kernel backend {backend!r}; known: {list(BACKENDS)}")
    try:
        importlib.import_module(_BACKEND_MODULES[backend])
    except ImportError as exc:
        log.info("kernel backend %s unavailable: %s", backend, exc)
        return False
    return True


def backend_available(backend: str, device_type: str) -> bool:
    """Whether `backend` imports and says it can run on `device_type`."""
    if not load_backend(backend):
        return False
    probe = _PROBES.get(backend)
    return bool(probe and probe(device_type))


def implementations(op: str) -> dict[str, Callable]:
    """Backend name -> implementation of `op`, for the backends loaded so far."""
    for backend in BACKENDS:
        load_backend(backend)
    return dict(_IMPLS[op])


@dataclass
class KernelSet:
    """Each operation resolved to one implementation for one device.

    Args:
        device_type: "cpu" or "cuda".
        prefer: backends in order of preference for every op, e.g. ("triton", "torch").
        overrides: per-op preference, e.g. {"decode_attention": ("jax", "torch")}.
    """

    device_type: str = "cpu"
    prefer: Sequence[str] = ("torch",)
    overrides: Mapping[str, Sequence[str]] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for op in self.overrides:
            if op not in OPS:
                raise ValueError(f"kernel override for unknown operation {op!r}; known: {list(OPS)}")
        for name in list(self.prefer) + [b for bs in self.overrides.values() for b in bs]:
            if name not in BACKENDS:
                raise ValueError(f"unknown kernel backend {name!r}; known: {list(BACKENDS)}")
        self._fns: dict[str, Callable] = {}
        for op in OPS:
            order = list(self.overrides.get(op, self.prefer))
            if "torch" not in order:
                order.append("torch")
            for backend in order:
                if backend_available(backend, self.device_type) and backend in _IMPLS[op]:
                    self._fns[op] = _IMPLS[op][backend]
                    self.chosen[op] = backend
                    break
            else:  # pragma: no cover - the torch reference implements every op
                raise RuntimeError(f"no backend implements {op!r}")

    def __getattr__(self, op: str) -> Callable:
        fns = self.__dict__.get("_fns")
        if fns is not None and op in fns:
            return fns[op]
        raise AttributeError(op)

    @classmethod
    def default_for(
        cls, device_type: str, backend: str = "auto", overrides: Mapping[str, Sequence[str]] | None = None
    ) -> "KernelSet":
        """`backend="auto"`: triton then torch on CUDA, torch on CPU; or one backend's name."""
        if backend == "auto":
            prefer = ("triton", "torch") if device_type == "cuda" else ("torch",)
        else:
            prefer = (backend, "torch")
        return cls(device_type, prefer, dict(overrides or {}))
