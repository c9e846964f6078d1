"""Serving: an OpenAI-compatible gateway process in front of an engine-core process.

    client --HTTP/SSE--> gateway (FastAPI: validation, chat templates, tokenization, detokenization)
                           |  ZMQ over ipc:// sockets, msgpack-encoded records (protocol.py)
                           v
                         engine core process (core_proc.py: EngineCore.step() in a loop)

HTTP parsing and tokenization never run in the process that schedules and
executes, so they cannot stall the loop. `python -m engine.serve` starts both.
"""
