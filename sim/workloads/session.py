"""The shape of a session: its calls (`Turn`) and the shared prefix it starts with (`Session`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One model call of a session.

    new_tokens: tokens appended to the context before this call (> 0).
    output_tokens: tokens generated for this call, with ignore_eos (>= 1).
    pause_after: seconds from this call's finish to the next call's arrival; 0 for the last.
    new_token_ids: the new tokens themselves, only from traces that give them.
    """

    new_tokens: int
    output_tokens: int
    pause_after: float
    new_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.output_tokens < 1 or not 0 <= self.pause_after < math.inf:
            raise ValueError(f"invalid turn {self}")
        if self.new_token_ids is not None and len(self.new_token_ids) != self.new_tokens:
            raise ValueError(f"turn has {self.new_tokens} new tokens but {len(self.new_token_ids)} ids")


@dataclass(frozen=True)
class Session:
    """A conversation or agent run: one shared prefix, then its calls in order.

    start_time: arrival of the first call in seconds (open loop; closed-loop drivers ignore it).
    prefix_id: the shared system/tool prefix it starts with (-1: none); equal ids mean
        identical prefixes of `prefix_tokens` tokens (0 when prefix_id is -1).
    """

    session_id: str
    start_time: float
    prefix_id: int
    prefix_tokens: int
    turns: tuple[Turn, ...]

    def __post_init__(self) -> None:
        if not self.turns or self.turns[-1].pause_after != 0:
            raise ValueError(f"session {self.session_id!r} needs turns, the last with pause_after 0")
        if (self.prefix_id == -1) != (self.prefix_tokens == 0) or self.prefix_id < -1 or self.prefix_tokens < 0:
            raise ValueError(f"session {self.session_id!r}: prefix_id -1 exactly when prefix_tokens is 0")
        if not (math.isfinite(self.start_time) and self.start_time >= 0):
            raise ValueError(f"session {self.session_id!r}: start_time must be finite and >= 0")
