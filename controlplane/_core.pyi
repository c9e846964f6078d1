"""Type stub of the C++ control plane (`csrc/bindings.cpp`).

A Plan's layout, for R scheduled requests, T tokens and S sampled requests::

    per request (R rows, batch order)        per token (T entries)
    req_ids       [r0   r1   r2 ]            input_ids     [a a a a | b | c c c]
    query_lens    [4    1    3  ]            positions     [0 1 2 3 | 9 | 4 5 6]
    cached_lens   [0    9    4  ]            slot_mapping  [block * block_size + offset, ...]
    query_start_loc [0  4    5    8]  (R+1)
    slots         [0    3    1  ]  --> rows of block_table
    sample        [1    1    0  ]  (r2 is mid-prefill: no token this step)
    logits_indices [3   4]         (S entries: token index whose logits are sampled)

    block_table  [max_num_seqs, max_blocks_per_seq] int32, -1 = no block
       slot 0: [ 7  2 -1 -1 ...]     the scheduler's persistent table; a request's row
       slot 1: [ 5  8 -1 -1 ...]     stays put while it runs (read rows via `slots`);
       slot 3: [ 1  4  9 -1 ...]     valid from step() until the plan is committed

    kv_ops       [K, 3] int32 rows (op, src, dst), run in order before the forward pass:
                 op 0 = copy device block src -> host block dst (swap out)
                 op 1 = copy host block src -> device block dst (swap in)

Request r's query tokens are ``input_ids[query_start_loc[i]:query_start_loc[i+1]]``;
its context is positions ``[0, cached_lens[i] + query_lens[i])``, addressed through
``block_table[slots[i]]``. Every array is a read-only numpy view of C++ memory
(no copies); it keeps the plan, and the plan keeps the scheduler, alive.
"""

from typing import Any, Iterable, Sequence

import numpy as np
import numpy.typing as npt

class InvariantError(RuntimeError):
    """An internal invariant of the control plane was violated (a bug, never bad input)."""

class RequestState:
    WAITING: RequestState
    PREFILLING: RequestState
    DECODING: RequestState
    PREEMPTED: RequestState
    FINISHED: RequestState
    ABORTED: RequestState
    __members__: dict[str, RequestState]
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

def transition_allowed(src: RequestState, dst: RequestState) -> bool: ...
def policy_names(kind: str) -> list[str]:
    """Registered names (C++ and Python) for kind "ordering", "eviction", "preemption" or "router"."""

# -- policies (csrc/policies.h, csrc/py_policies.cpp; docs/policies.md) ---------------------------

class PolicyError(RuntimeError):
    """A policy raised or returned something invalid; names the policy, the cause is chained."""

class OrderKey:
    def __init__(self, primary: float, secondary: float = 0.0) -> None: ...
    primary: float
    secondary: float

class PreemptMode:
    RECOMPUTE: PreemptMode
    SWAP: PreemptMode

class RequestView:
    def __init__(
        self,
        *,
        id: int = 0,
        arrival_time: float = 0.0,
        priority: int = 0,
        num_prompt_tokens: int = 0,
        num_output_tokens: int = 0,
        num_computed_tokens: int = 0,
        num_cached_tokens: int = 0,
        num_blocks: int = 0,
        preempted: bool = False,
        swapped: bool = False,
        session_id: str = "",
        num_computed_total: int = 0,
        session_turns: int = 0,
        session_service: int = 0,
        session_last_end: float | None = None,
    ) -> None: ...
    id: int
    arrival_time: float
    priority: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int
    num_blocks: int
    preempted: bool
    swapped: bool
    session_id: str
    num_computed_total: int
    session_turns: int
    session_service: int
    session_last_end: float | None

class CachedBlockView:
    def __init__(
        self, *, block: int = 0, last_access: float = 0.0, depth: int = 0, priority: int = 0, hits: int = 0
    ) -> None: ...
    block: int
    last_access: float
    depth: int
    priority: int
    hits: int

class TurnView:
    def __init__(
        self,
        *,
        session_id: str = "",
        request_id: int = 0,
        now: float = 0.0,
        num_tokens: int = 0,
        num_blocks: int = 0,
        priority: int = 0,
        cache_blocks: int = 0,
        turn_index: int = 0,
        session_service: int = 0,
        pauses: Sequence[float] = (),
    ) -> None: ...
    session_id: str
    request_id: int
    now: float
    num_tokens: int
    num_blocks: int
    priority: int
    cache_blocks: int
    turn_index: int
    session_service: int
    pauses: list[float]

class RouteView:
    def __init__(
        self, *, request_id: int = 0, session_id: str = "", num_prompt_tokens: int = 0, now: float = 0.0
    ) -> None: ...
    request_id: int
    session_id: str
    num_prompt_tokens: int
    now: float

class ReplicaView:
    def __init__(
        self,
        index: int,
        load: int,
        num_free_blocks: int = 0,
        num_blocks: int = 0,
        cached_prefix_tokens: int = 0,
        decode_step_s: float = 0.0,
    ) -> None: ...
    index: int
    load: int
    num_free_blocks: int
    num_blocks: int
    cached_prefix_tokens: int
    decode_step_s: float

class OrderingPolicy:
    def name(self) -> str: ...
    def key(self, request: RequestView) -> float | tuple[float, float]: ...
    def needs_prefix_match(self) -> bool: ...

class EvictionPolicy:
    def name(self) -> str: ...
    def key(self, block: CachedBlockView) -> float | tuple[float, float]: ...
    def pin_seconds(self, turn: TurnView) -> float: ...

class PreemptionPolicy:
    def name(self) -> str: ...
    def mode(self, victim: RequestView, host_free_blocks: int, blocks_needed: int) -> str: ...

class RouterPolicy:
    def name(self) -> str: ...
    def route(self, call: RouteView, replicas: list[ReplicaView]) -> int: ...
    def needs_prefix_match(self) -> bool: ...
    def needs_step_prediction(self) -> bool: ...
    def end_session(self, session_id: str) -> None: ...

class Router:
    """A router chosen by spec; every decision checked (PolicyError if out of range)."""
    def __init__(self, spec: str) -> None: ...
    def route(
        self, request_id: int, session_id: str, num_prompt_tokens: int, now: float, replicas: list[ReplicaView]
    ) -> int: ...
    def end_session(self, session_id: str) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def needs_prefix_match(self) -> bool: ...
    @property
    def needs_step_prediction(self) -> bool: ...

def make_policy(kind: str, spec: str) -> OrderingPolicy | EvictionPolicy | PreemptionPolicy | RouterPolicy:
    """An instance of any registered policy (e.g. to unit-test its decisions on hand-built views)."""

def prompt_block_hashes(
    prompt_token_ids: Sequence[int] | np.ndarray, block_size: int, cache_namespace: str | None = None
) -> list[int]:
    """The chained prefix-index hashes of the prompt's full blocks, as the scheduler computes them
    (csrc/hashing.h): what a router compares with an engine's KV events."""

def parse_policy_spec(spec: str) -> tuple[str, dict[str, float]]:
    """Splits "name:key=value,..." into the name and its parameters."""

class SchedulerConfig:
    num_blocks: int
    block_size: int
    num_host_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    chunk_size: int
    idle_chunk_size: int
    max_model_len: int
    vocab_size: int
    enable_prefix_caching: bool
    ordering: str
    eviction: str
    preemption: str
    admission: str
    num_lookahead_tokens: int
    def __init__(self) -> None: ...

class Plan:
    @property
    def step_id(self) -> int: ...
    @property
    def now(self) -> float: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_reqs(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def has_token_arrays(self) -> bool:
        """False for the simulator's fast-path plans (sim._native.ClusterForward): input_ids,
        positions and slot_mapping are empty there (no model reads them); num_tokens still counts."""
    @property
    def num_sampled(self) -> int: ...
    @property
    def attn_pairs(self) -> int:
        """Sum over requests of causal (query, key) pairs computed: q*c + q*(q+1)/2."""
    @property
    def kv_read_tokens(self) -> int:
        """Sum over requests of c + q: KV tokens attention reads."""
    @property
    def num_swap_out_blocks(self) -> int: ...
    @property
    def num_swap_in_blocks(self) -> int: ...
    @property
    def num_decode_reqs(self) -> int:
        """Requests with q == 1 (the engine's decode rows)."""
    @property
    def decode_kv_tokens(self) -> int:
        """Sum of c + 1 over those rows."""
    @property
    def follows_decode(self) -> int:
        """1 if the last non-empty plan committed was a pure decode (T == R == S) with a request that
        went on after it: an engine with overlapped decode launched a guess of this step."""
    @property
    def continues_decode(self) -> int:
        """1 if follows_decode and this plan is a pure decode of requests all in that plan (the guess is it)."""
    @property
    def is_empty(self) -> bool:
        """No request scheduled and no KV copy to run."""
    @property
    def req_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def query_lens(self) -> npt.NDArray[np.int32]: ...
    @property
    def cached_lens(self) -> npt.NDArray[np.int32]: ...
    @property
    def query_start_loc(self) -> npt.NDArray[np.int32]: ...
    @property
    def slots(self) -> npt.NDArray[np.int32]: ...
    @property
    def sample(self) -> npt.NDArray[np.bool_]: ...
    @property
    def logits_indices(self) -> npt.NDArray[np.int32]: ...
    @property
    def input_ids(self) -> npt.NDArray[np.int32]: ...
    @property
    def positions(self) -> npt.NDArray[np.int32]: ...
    @property
    def slot_mapping(self) -> npt.NDArray[np.int64]: ...
    @property
    def preempted_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def kv_ops(self) -> npt.NDArray[np.int32]: ...
    @property
    def block_table(self) -> npt.NDArray[np.int32]: ...

class FinishedRequest:
    request_id: int
    finish_reason: str  # "stop" | "length" | "model_length"
    num_prompt_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    num_computed_tokens: int  # over its life, recomputation included
    output_token_ids: list[int]
    output_token_array: npt.NDArray[np.int32]  # the same ids as one array (a copy)
    num_output_tokens: int
    arrival_time: float
    first_scheduled_time: float
    first_token_time: float
    finish_time: float
    token_times: npt.NDArray[np.float64]  # commit time (`now`) of each output token

class Stats:
    num_waiting: int
    num_running: int
    num_preempted: int
    num_swapped: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_evictable_blocks: int
    num_pinned_blocks: int
    num_used_blocks: int
    num_host_blocks: int
    num_free_host_blocks: int
    num_steps: int
    num_finished: int
    num_aborted: int
    num_preemptions_recompute: int
    num_preemptions_swap: int
    num_evicted_blocks: int
    prompt_tokens: int
    computed_tokens: int
    cached_tokens: int
    generated_tokens: int
    num_admission_cuts: int
    num_held_too_long: int
    num_held_waiting: int
    def as_dict(self) -> dict[str, int]: ...

class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None: ...
    def add_request(
        self,
        request_id: int,
        prompt_token_ids: Sequence[int] | npt.NDArray[np.integer],
        *,
        max_new_tokens: int = 16,
        stop_token_ids: Iterable[int] = (),
        eos_token_id: int = -1,
        ignore_eos: bool = False,
        arrival_time: float = 0.0,
        session_id: str | None = None,
        priority: int = 0,
        cache_namespace: str | None = None,
    ) -> None: ...
    def add_continuation(
        self,
        request_id: int,
        after: int,
        new_token_ids: Sequence[int] | npt.NDArray[np.integer],
        *,
        max_new_tokens: int = 16,
        stop_token_ids: Iterable[int] = (),
        eos_token_id: int = -1,
        ignore_eos: bool = False,
        arrival_time: float = 0.0,
        session_id: str,
        priority: int = 0,
        cache_namespace: str | None = None,
    ) -> bool:
        """`add_request` of request `after`'s tokens (its prompt, then its output) + `new_token_ids`,
        where `after` is the session's last finished request on this scheduler (its turn memo holds
        those tokens, so the context is not sent again). Checks as `add_request` of the whole prompt.

        Returns:
            False, with nothing changed, when the session's memo is not `after`'s (dropped, taken,
            another namespace, prefix caching off): add the whole prompt with `add_request` then.
        """
    def step(self, now: float) -> Plan: ...
    def commit(
        self, plan: Plan, tokens: Sequence[int] | npt.NDArray[np.integer], now: float
    ) -> list[FinishedRequest]: ...
    def abort(self, request_id: int, now: float) -> None: ...
    def end_session(self, session_id: str, now: float) -> int:
        """Releases the session's retention pins; returns how many blocks it still pinned."""
    def set_step_cost(self, cost: Any) -> None:
        """The step-cost model (a sim._native.StepCost) the admission policy predicts step times with."""
    @property
    def has_step_cost(self) -> bool: ...
    def predicted_decode_seconds(self, context: int) -> float:
        """The decode step of every request here and one more of `context` tokens (0.0 without a step cost)."""
    @property
    def admission(self) -> str: ...
    def snapshot(self) -> Scheduler:
        """A copy of the whole state that plans exactly as this scheduler would; changes nothing here."""
    @property
    def policies(self) -> dict[str, str]: ...
    def set_policy(self, kind: str, spec: str) -> None:
        """Replaces the ordering, preemption or admission policy by a spec's, between steps."""
    def stats(self) -> Stats: ...
    def check_invariants(self) -> None:
        """Raises InvariantError if any control-plane invariant is broken."""
    def has_unfinished(self) -> bool: ...
    def has_pending_plan(self) -> bool: ...
    @property
    def failure(self) -> str:
        """The PolicyError that stopped this scheduler ('' while it runs)."""
    @property
    def num_available_blocks(self) -> int: ...
    def request_info(self, request_id: int) -> dict: ...
    def cached_prefix_tokens(
        self, prompt_token_ids: Sequence[int] | npt.NDArray[np.integer], cache_namespace: str | None = None
    ) -> int:
        """Tokens of this prompt a new request would find in the prefix cache now; changes nothing."""
    def record_kv_events(self, on: bool = True) -> None:
        """Starts (or stops) recording what enters and leaves the prefix index (off by default; changes
        no decision). Read the record with `drain_kv_events` (engine/kv_events.py, docs/kv-events.md)."""
    @property
    def recording_kv_events(self) -> bool: ...
    def drain_kv_events(self) -> list[tuple[str, list[int], int | None, list[int]]]:
        """The events recorded since the last drain, oldest first, and an empty record after.

        Returns:
            (kind, block_hashes, parent_block_hash, token_ids) tuples. kind "BlockStored": full blocks
            that entered the prefix index, a chain (each block's parent is the one before it; the first
            one's is parent_block_hash, None for a sequence's first block), token_ids their
            len(block_hashes) * block_size tokens. kind "BlockRemoved": evicted blocks (parent None,
            token_ids empty).
        """
    def cached_block_hashes(self) -> list[int]:
        """The block hashes (unsigned 64-bit) in the prefix index now, sorted."""
    @property
    def block_size(self) -> int: ...
    @property
    def max_blocks_per_seq(self) -> int: ...
    @property
    def ordering(self) -> str: ...
