"""A Python-defined policy for the engine/simulator parity test (imported through policy_modules)."""

from controlplane import OrderingPolicy, register_policy


@register_policy("ordering", "newest_first")
class NewestFirst(OrderingPolicy):
    """Last come, first served; preempts the oldest first. Deliberately unlike every built-in."""

    def key(self, r):
        return (-r.arrival_time, -r.id)
