"""`python -m engine.serve`: the gateway in this process, the engine core in a spawned one.

    python -m engine.serve                                  # SmolLM2-135M-Instruct, 127.0.0.1:8000
    python -m engine.serve model=/models/Llama-3.1-8B-Instruct port=9000 api_key=secret
    python -m engine.serve model=llama-3.1-8b engine.load_format=dummy engine.tokenizer=/tok/llama3

Exits non-zero if the engine core dies (after answering 503 meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class ServeConfig:
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Any = None
    served_model_name: Any = None
    log_level: str = "info"
    engine: dict = field(default_factory=dict)


ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def served_name(model: str) -> str:
    from engine.loader import resolve_model

    path = resolve_model(model)
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def serve(options: dict) -> int:
    """Runs the server until it is stopped; returns the process exit status."""
    import uvicorn

    from engine.config import EngineConfig
    from engine.loader import load_tokenizer
    from engine.serve.client import CoreClient
    from engine.serve.gateway import GatewayState, create_app

    engine_options = {"model": options.get("model", ""), **dict(options.get("engine") or {})}
    engine_cfg = EngineConfig.from_dict(engine_options)  # bad options fail here, before anything starts
    tokenizer = load_tokenizer(engine_cfg)
    client = CoreClient(engine_options)
    state = GatewayState(client, tokenizer, options.get("served_model_name") or served_name(engine_cfg.model),
                         options.get("api_key"))
    status = {"code": 0}
    server: uvicorn.Server | None = None

    def died():
        status["code"] = 1
        if server is not None:
            asyncio.get_running_loop().call_later(1.0, setattr, server, "should_exit", True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client.on_death = died
        await client.start()
        logging.getLogger("tandem").info("serving %s on http://%s:%s", state.model_name, options.get("host"),
                                         options.get("port"))
        yield
        await client.close()

    app = create_app(state, lifespan=lifespan)
    config = uvicorn.Config(app, host=options.get("host", "127.0.0.1"), port=int(options.get("port", 8000)),
                            log_level=options.get("log_level", "info"), timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when the lifespan (the core's start) fails
        return int(exc.code or 1)
    if client.dead or status["code"]:
        return 1
    return 0 if server.started else 1


@hydra.main(version_base="1.3", config_path="conf", config_name="config")  # in the package: works installed
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    code = serve(OmegaConf.to_container(cfg, resolve=True))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
