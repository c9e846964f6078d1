"""Writing policies in Python, and selecting any policy by name.

Every policy kind has one interface, bound from C++ (csrc/policies.h):

=============  ==========================================================  ======================
kind           what it decides                                             Python base class
=============  ==========================================================  ======================
ordering       who is admitted first and preempted last: ``key(request)``  ``OrderingPolicy``
eviction       which unheld cached block goes first: ``key(block)``;       ``EvictionPolicy``
               retention, ``pin_seconds(turn)``
preemption     recompute or swap a victim: ``mode(victim, free, needed)``  ``PreemptionPolicy``
router         which replica serves a model call (the simulator's          ``RouterPolicy``
               cluster): ``route(call, replicas)``
=============  ==========================================================  ======================

A subclass registered with :func:`register_policy` is selected exactly as a C++ one is, by
its name in a policy spec (``"name"`` or ``"name:key=value,..."``) in a ``SchedulerConfig``,
the simulator's ``policy``/``cluster.router`` config or the engine's config; the spec's
parameters become the constructor's keyword arguments. Policies read views, never the
scheduler: they must not read a clock (``now`` comes in the views that need it) or keep
state that depends on anything but the calls they receive (routers may count calls), so that
the same inputs give the same decisions in the simulator and on the GPU. An exception in a
policy surfaces as :class:`PolicyError` naming it, with the original exception as its cause;
the scheduler then refuses further calls (its state may be half-way through a decision).

See docs/policies.md for a walkthrough and ``make check-policy POLICY=name`` for the
conformance suite every registered policy must pass.
"""

from __future__ import annotations

import atexit
import importlib
from typing import Callable, Iterable, TypeVar

from controlplane import _core
from controlplane._core import (
    CachedBlockView,
    EvictionPolicy,
    OrderKey,
    OrderingPolicy,
    PolicyError,
    PreemptMode,
    PreemptionPolicy,
    ReplicaView,
    RequestView,
    RouteView,
    Router,
    RouterPolicy,
    TurnView,
    make_policy,
)

KINDS = ("ordering", "eviction", "preemption", "router")
BASES = {"ordering": OrderingPolicy, "eviction": EvictionPolicy, "preemption": PreemptionPolicy, "router": RouterPolicy}

T = TypeVar("T")


def register_policy(kind: str, name: str, factory: Callable[..., object] | None = None):
    """Registers a Python policy under `name`; usable as a class decorator.

    Args:
        kind: "ordering", "eviction", "preemption" or "router".
        name: the name specs select it by (no ':' or ','); a built-in name is refused,
            a Python one may be registered again (the latest wins, e.g. a re-run notebook cell).
        factory: a subclass of the kind's base class, or a callable returning an instance;
            called with the spec's parameters as keyword arguments (floats).
    """
    if kind == "admission":
        raise ValueError("admission policies are written in C++ (csrc/policies.cpp); Python ones cannot be registered")
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; kinds: {list(KINDS)}")

    def add(obj: T) -> T:
        if isinstance(obj, type) and not issubclass(obj, BASES[kind]):
            raise TypeError(
                f"{kind} policy {name!r}: {obj.__qualname__} must subclass controlplane.{BASES[kind].__name__}"
            )
        if not callable(obj):
            raise TypeError(f"{kind} policy {name!r}: the factory must be a class or a callable")
        _core._register_python_policy(kind, name, obj)
        return obj

    return add if factory is None else add(factory)


def unregister_policy(kind: str, name: str) -> None:
    """Removes a Python-registered policy (built-in ones stay); ValueError if there is none by that name."""
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; kinds: {list(KINDS)}")
    _core._unregister_python_policy(kind, name)


def policy_names(kind: str) -> list[str]:
    """Every name registered for `kind`, C++ and Python."""
    return list(_core.policy_names(kind))


def python_policy_names(kind: str) -> list[str]:
    """The names registered from Python for `kind` (none for admission: those are C++ only)."""
    if kind == "admission":
        return []
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; kinds: {list(KINDS)}")
    return list(_core._python_policy_names(kind))


def import_policy_modules(modules: Iterable[str]) -> None:
    """Imports modules that register policies (a SchedulerConfig's ``policy_modules``)."""
    for module in modules or ():
        if not isinstance(module, str) or not module:
            raise ValueError(f"policy modules are dotted module names, got {module!r}")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"policy module {module!r} could not be imported: {exc}") from exc


def check_spec(kind: str, spec: str) -> None:
    """Raises ValueError if `spec` does not name a registered `kind` policy."""
    name, _ = _core.parse_policy_spec(spec)
    if name not in policy_names(kind):
        raise ValueError(f"unknown policy {name!r} ({kind}) in {spec!r}; registered: {policy_names(kind)}")


# Python factories must be dropped while the interpreter still runs.
atexit.register(_core._clear_python_policies)

__all__ = [
    "BASES",
    "KINDS",
    "CachedBlockView",
    "EvictionPolicy",
    "OrderKey",
    "OrderingPolicy",
    "PolicyError",
    "PreemptMode",
    "PreemptionPolicy",
    "ReplicaView",
    "RequestView",
    "RouteView",
    "Router",
    "RouterPolicy",
    "TurnView",
    "check_spec",
    "import_policy_modules",
    "make_policy",
    "policy_names",
    "python_policy_names",
    "register_policy",
    "unregister_policy",
]
