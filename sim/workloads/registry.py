"""Workloads by name: `make_workload(name, params)` builds one from a Hydra `workload:` section."""

from __future__ import annotations

from typing import Any, Mapping

from sim.workloads.agentic import AgenticCodingWorkload, SweSmithWorkload
from sim.workloads.base import Workload
from sim.workloads.chat import ChatWorkload
from sim.workloads.traces import TraceWorkload

WORKLOADS: Mapping[str, type[Workload]] = {
    cls.name: cls for cls in (AgenticCodingWorkload, SweSmithWorkload, ChatWorkload, TraceWorkload)
}


def make_workload(name: str, params: Mapping[str, Any] | None = None) -> Workload:
    """Builds a registered workload from its name and parameters.

    Raises:
        ValueError: unknown name, unknown parameter names (listing the known ones) or bad values.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    cls = WORKLOADS[name]
    return cls(cls.config_class.from_dict(params or {}))
