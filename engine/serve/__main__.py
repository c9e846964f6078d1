"""`python -m engine.serve`: the gateway in this process, the engine core in a spawned one.

    python -m engine.serve                                  # SmolLM2-135M-Instruct, 127.0.0.1:8000
    python -m engine.serve model=/models/Llama-3.1-8B-Instruct port=9000 api_key=secret
    python -m engine.serve model=llama-3.1-8b engine.load_format=dummy engine.tokenizer=/tok/llama3
    python -m engine.serve scheduler.eviction=ttl:ttl=30 scheduler.max_model_len=4096
    python -m engine.serve scheduler=agentic scheduler.chunk_size=4096      # conf/scheduler/agentic.yaml
    python -m engine.serve data_parallel_size=2 cluster.router=prefix_aware   # 2 cores (one per GPU), routed

`engine.KEY=VALUE` sets any engine.config.EngineConfig field but `model` and `scheduler` (no `+`
needed; an unknown key is refused); `scheduler=NAME` composes conf/scheduler/NAME.yaml (of the
checkout, or $TANDEM_CONF_DIR) and `scheduler.KEY=VALUE` sets a controlplane.SchedulerConfig field.
Exits non-zero if the engine core dies (after answering 503 meanwhile).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import logging
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from controlplane.cli import fix_sys_argv
from controlplane.config import SchedulerConfig
from engine.config import ENGINE_SCHEDULER_DEFAULTS, EngineConfig
from sim.specs import CONF_DIR


def _node_type(hint: Any) -> Any:
    """The OmegaConf type of an EngineConfig field's type: tuples become lists, anything else Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (str, int, float, bool):
        return hint
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _node_type(next(a for a in args if a is not type(None)))
        # an optional mapping is Any: OmegaConf cannot merge `key={...}` into a typed mapping that is None
        return Optional[inner] if inner is not Any and typing.get_origin(inner) is not dict else Any
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return List[_node_type(args[0])]
    if origin in (dict, typing.Mapping, collections.abc.Mapping) and args and args[0] is str:
        return Dict[str, _node_type(args[1])]
    return Any


def _engine_node() -> type:
    """A structured config with EngineConfig's fields and defaults (`model`, `scheduler`: the server's own keys)."""
    hints = typing.get_type_hints(EngineConfig)
    specs = []
    for f in fields(EngineConfig):
        if f.name in ("model", "scheduler"):
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        if isinstance(default, (tuple, list)):
            specs.append((f.name, _node_type(hints[f.name]), field(default_factory=lambda v=default: list(v))))
        elif isinstance(default, dict):
            specs.append((f.name, _node_type(hints[f.name]), field(default_factory=lambda v=default: dict(v))))
        else:
            specs.append((f.name, _node_type(hints[f.name]), field(default=default)))
    return make_dataclass("EngineOptions", specs)


EngineOptions = _engine_node()


@dataclass
class ClusterOptions:
    """The simulator's `cluster` keys that mean something here (its num_replicas is data_parallel_size)."""

    router: str = "round_robin"  # a router policy spec, as sim's cluster.router (C++, or Python from policy_modules)


@dataclass
class ServeConfig:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Any = None
    served_model_name: Any = None
    log_level: str = "info"
    data_parallel_size: int = 1
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(**ENGINE_SCHEDULER_DEFAULTS))


schema = OmegaConf.structured(ServeConfig)
OmegaConf.set_readonly(schema.scheduler, False)  # a frozen dataclass: Hydra merges conf/scheduler/ onto it
ConfigStore.instance().store(name="serve_schema", node=schema)
for path in sorted((CONF_DIR / "scheduler").glob("*.yaml")):  # the simulator's scheduler group, in the package too
    ConfigStore.instance().store(group="scheduler", name=path.stem, node=OmegaConf.load(path))
ENGINE_KEYS = frozenset(f"engine.{f.name}" for f in fields(EngineOptions))
ENGINE_MAPPINGS = frozenset(
    f"engine.{f.name}" for f in fields(EngineOptions) if f.type is not Any and typing.get_origin(f.type) is dict
)


def check_engine_keys(args: list[str]) -> None:
    """Exits naming the EngineConfig fields when an override sets an engine key that is not one."""
    for arg in args:
        key = arg.partition("=")[0].lstrip("+~")
        if not key.startswith("engine.") or ".".join(key.split(".")[:2]) in ENGINE_KEYS:
            continue
        hint = (
            "the model is the top-level model=..."
            if key == "engine.model"
            else f"engine.KEY is one of {sorted(k[len('engine.') :] for k in ENGINE_KEYS)} "
            f"(the scheduler's settings are scheduler.KEY)"
        )
        sys.exit(f"unknown engine option {key!r} in {arg!r}: {hint}")


def served_name(model: str) -> str:
    from engine.loader import resolve_model

    path = resolve_model(model)
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def serve(options: dict) -> int:
    """Runs the server until it is stopped; returns the process exit status."""
    import uvicorn

    from engine.loader import load_tokenizer
    from engine.serve.gateway import GatewayState, create_app

    engine_options = {
        "model": options.get("model", ""),
        **dict(options.get("engine") or {}),
        "scheduler": dict(options.get("scheduler") or {}),
    }
    engine_cfg = EngineConfig.from_dict(engine_options)  # bad options fail here, before anything starts
    if engine_cfg.tensor_parallel_size > 1:  # and a size the model's shape does not divide
        from engine.loader import load_config
        from engine.tensor_parallel import check_divisible

        check_divisible(load_config(engine_cfg), engine_cfg.tensor_parallel_size)
    size = int(options.get("data_parallel_size", 1))
    router = make_router(engine_options, engine_cfg, size, (options.get("cluster") or {}).get("router", "round_robin"))
    tokenizer = load_tokenizer(engine_cfg)
    state = GatewayState(
        router, tokenizer, options.get("served_model_name") or served_name(engine_cfg.model), options.get("api_key")
    )
    status = {"code": 0}
    server: uvicorn.Server | None = None
    log = logging.getLogger("tandem")

    def died(client):
        if router.live:  # the others serve on; the router no longer sends it work
            log.error("engine core replica %d died; serving on %d of %d", client.index, len(router.live), size)
            return
        status["code"] = 1
        if server is not None:
            asyncio.get_running_loop().call_later(1.0, setattr, server, "should_exit", True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for client in router.clients:
            client.on_death = died
        try:
            await asyncio.gather(*(c.start() for c in router.clients))
            log.info(
                "serving %s on http://%s:%s (%d engine core%s, router %s)",
                state.model_name,
                options.get("host"),
                options.get("port"),
                size,
                "s" if size > 1 else "",
                router.spec,
            )
            yield
        finally:
            await asyncio.gather(*(c.close() for c in router.clients), return_exceptions=True)

    app = create_app(state, lifespan=lifespan)
    config = uvicorn.Config(
        app,
        host=options.get("host", "127.0.0.1"),
        port=int(options.get("port", 8000)),
        log_level=options.get("log_level", "info"),
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when the lifespan (the core's start) fails
        return int(exc.code or 1)
    if not router.live or status["code"]:
        return 1
    return 0 if server.started else 1


def make_router(engine_options: dict, engine_cfg: EngineConfig, size: int, spec: str):
    """`size` engine-core clients (not started; where CUDA devices exist, tensor_parallel_size GPUs each:
    its ranks') behind a router of `spec`.

    Raises:
        ValueError: a bad size or router, or fewer visible GPUs than cores times their ranks.
    """
    import controlplane as cp
    from engine.serve.client import CoreClient
    from engine.serve.router import ReplicaRouter

    if size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {size}")
    try:
        cp.policies.check_spec("router", spec)
        cp.policies.Router(spec)  # bad parameters fail here too
    except (ValueError, cp.PolicyError) as exc:
        raise ValueError(f"cluster.router: {exc}") from None
    devices = [None] * size
    tp = engine_cfg.tensor_parallel_size
    if size * tp > 1 and engine_cfg.device != "cpu":
        import torch

        if torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            if len(ids) < size * tp:
                raise ValueError(
                    f"data_parallel_size={size} x tensor_parallel_size={tp} needs {size * tp} GPUs; {len(ids)} visible"
                )
            if size > 1:
                devices = [",".join(ids[i * tp : (i + 1) * tp]) for i in range(size)]
    clients = [
        CoreClient(_rank_options(engine_options, i, size), index=i, keep_kv_events=size > 1, cuda_devices=devices[i])
        for i in range(size)
    ]
    return ReplicaRouter(clients, spec, engine_cfg.scheduler.block_size)


def _rank_options(engine_options: dict, rank: int, size: int) -> dict:
    """Core `rank`'s engine options: with several cores, KV events on endpoints of its own and its rank."""
    from engine.kv_events import KVEventsConfig

    events = KVEventsConfig.from_value(engine_options.get("kv_events"))
    if size == 1 or events is None:
        return engine_options
    return {**engine_options, "kv_events": dataclasses.asdict(events.for_rank(rank))}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")  # in the package: works installed
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = serve(OmegaConf.to_container(cfg, resolve=True))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    schedule_keys = {f"scheduler.{f.name}" for f in fields(SchedulerConfig)}
    fix_sys_argv(existing=ENGINE_KEYS | schedule_keys, mappings=ENGINE_MAPPINGS)  # "+engine.KEY=..." still works
    check_engine_keys(sys.argv[1:])
    main()
