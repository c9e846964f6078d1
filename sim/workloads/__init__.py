"""Workload generators: the shape of agent and chat sessions, for the simulator.

A workload yields `Session`s: token counts, output lengths and pauses, never
token ids (except from traces that carry them). The simulator turns a shape
into ids so that each call's prompt is exactly the previous prompt, plus the
previous output, plus the call's new tokens; prefix reuse is therefore real:

    call 1 prompt: [ prefix | n1 ]                         -> o1, then pause p1
    call 2 prompt: [ prefix | n1 | o1 | n2 ]               -> o2, then pause p2
    call 3 prompt: [ prefix | n1 | o1 | n2 | o2 | n3 ]     -> o3 (last: pause 0)

    start --call 1--> finish 1 --p1--> arrival 2 --call 2--> finish 2 --p2--> ...

Everything is a pure function of the seed: prefix lengths, the arrival process
and every session draw from their own `numpy.random.SeedSequence` children, so
session i is the same whatever the rate or however many sessions are asked for.
See docs/workloads.md for the defaults and where they come from.

    session.py    Turn, Session: the records every workload yields
    base.py       Workload (a source of sessions) and _Config (frozen, type-checked parameters)
    synthetic.py  generated workloads: arrivals, per-session streams, the samplers they share
    agentic.py    agentic_coding and swe_smith
    chat.py       chat
    traces.py     trace: the JSONL schema, load_trace and write_trace
    summary.py    summarize
    registry.py   WORKLOADS and make_workload
"""

from sim.workloads.agentic import AgenticCodingConfig, AgenticCodingWorkload, SweSmithConfig, SweSmithWorkload
from sim.workloads.base import Workload
from sim.workloads.chat import ChatConfig, ChatWorkload
from sim.workloads.registry import WORKLOADS, make_workload
from sim.workloads.session import Session, Turn
from sim.workloads.summary import summarize
from sim.workloads.traces import TraceConfig, TraceWorkload, load_trace, write_trace
from sim.workloads.traces import _read_trace as _read_trace  # the cached parse: a test clears its cache

__all__ = [
    "WORKLOADS",
    "AgenticCodingConfig",
    "AgenticCodingWorkload",
    "ChatConfig",
    "ChatWorkload",
    "Session",
    "SweSmithConfig",
    "SweSmithWorkload",
    "TraceConfig",
    "TraceWorkload",
    "Turn",
    "Workload",
    "load_trace",
    "make_workload",
    "summarize",
    "write_trace",
]
