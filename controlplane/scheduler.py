"""The Python face of the C++ scheduler."""

from __future__ import annotations

from typing import Any

from controlplane import _core
from controlplane.config import SchedulerConfig


class Scheduler(_core.Scheduler):
    """The control plane's scheduler; every method runs in C++.

    Args:
        config: a `SchedulerConfig`; keyword overrides replace its fields
            (``Scheduler(num_blocks=64, eviction="ttl:ttl=5")``).
    """

    def __init__(self, config: SchedulerConfig | None = None, **overrides: Any) -> None:
        config = config or SchedulerConfig()
        if overrides:
            merged = {**config.__dict__, **overrides}
            config = SchedulerConfig.from_dict(merged)
        self.config = config
        super().__init__(config.to_core())

    def set_policy(self, kind: str, spec: str) -> None:
        """Replaces the ordering, preemption or admission policy between steps (`config` follows).

        (A `snapshot()` is a plain controlplane._core.Scheduler: its `policies` say what it runs.)"""
        import dataclasses

        super().set_policy(kind, spec)
        self.config = dataclasses.replace(self.config, **{kind: spec})
