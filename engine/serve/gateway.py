"""The OpenAI-compatible HTTP gateway (FastAPI): validation, chat templates, tokenization, SSE.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, POST /v1/sessions/{id}/end (and DELETE /v1/sessions/{id}).
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}; /openapi.json says so
(api_schema.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.output import OutputProcessor
from engine.serve import api_schema as S
from engine.serve import responses as R
from engine.serve.client import CoreClient, CoreDied
from engine.serve.generation import Choice
from engine.serve.metrics import Metrics
from engine.serve.openai_api import (
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    CompletionRequest,
    sampling_params,
)
from engine.serve.router import ReplicaRouter

log = logging.getLogger("tandem.gateway")
REPLICA_HEADER = "x-tandem-replica"  # the engine core (replica index) each prompt of the request went to


class GatewayState:
    """What the routes share: the engine cores (one, or a data-parallel set behind `router`), the tokenizer,
    and the output processor of every request in flight."""

    def __init__(self, cores: CoreClient | ReplicaRouter, tokenizer, model_name: str, api_key: str | None) -> None:
        self.router = cores if isinstance(cores, ReplicaRouter) else ReplicaRouter([cores])
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.metrics = Metrics(self.router.clients)
        self.outputs = OutputProcessor(tokenizer)

    @property
    def client(self) -> CoreClient:
        """A live core (the first one if none lives): what every core shares (model length, vocabulary)."""
        live = self.router.live
        return live[0] if live else self.router.clients[0]

    @property
    def dead(self) -> bool:
        """No engine core is running."""
        return not self.router.live

    @property
    def max_model_len(self) -> int:
        return self.client.info.max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the engine core's): every token id it takes or generates is below it."""
        return self.client.info.vocab_size


class Gate:
    """The API key (every route but /health) and the core's liveness (a 503 on every route but /metrics).

    A pure ASGI middleware: under Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) a route's
    request.is_disconnected() never turns true, and a non-streamed request outlived its client.
    """

    def __init__(self, app, state: GatewayState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope["path"], dict(scope["headers"]).get(b"authorization", b""))
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, path: str, authorization: bytes) -> ApiError | None:
        key = self.state.api_key
        if key and path != "/health":
            scheme, _, token = authorization.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), str(key).encode()):
                return ApiError("invalid or missing API key", status=401, kind="authentication_error")
        if self.state.dead and path != "/metrics":
            return ApiError("the engine core is not running", status=503, kind="server_error")
        return None


def create_app(state: GatewayState, lifespan=None) -> FastAPI:
    app = FastAPI(title="Tandem", lifespan=lifespan)
    app.state.gateway = state
    app.add_middleware(Gate, state=state)
    app.openapi = lambda: S.openapi(app, state)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404, 405, unparsable bodies: OpenAI's shape too
        return JSONResponse(
            ApiError(str(exc.detail), status=exc.status_code).body(), status_code=exc.status_code, headers=exc.headers
        )  # a 405's Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        error = _validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health", response_model=S.Health)
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        # OpenAI's model object plus vLLM's max_model_len and the vocabulary, so that a client that sends
        # token ids (experiments/bench_serving.py) knows their range without being told; and the precision
        # in effect (activations, KV cache, weights)
        info = state.client.info
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "tandem",
                    "max_model_len": state.max_model_len,
                    "vocab_size": state.vocab_size,
                    "dtype": info.dtype,
                    "kv_cache_dtype": info.kv_cache_dtype,
                    "quantization": info.quantization,
                    "idle_chunk_size": info.idle_chunk_size,
                }
            ],
        }

    @app.get("/metrics", response_class=Response, responses=S.METRICS_RESPONSES)
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/sessions/{session_id}/end", response_model=S.SessionEnded, responses=S.SESSION_RESPONSES)
    @app.delete("/v1/sessions/{session_id}", response_model=S.SessionEnded, responses=S.SESSION_RESPONSES)
    async def end_session(session_id: str):
        try:
            known = await state.router.end_session(session_id)
        except CoreDied as exc:
            raise ApiError(str(exc), status=503, kind="server_error") from None
        if not known:
            raise ApiError(
                f"no session {session_id!r}: never started here, or already ended", status=404, code="session_not_found"
            )
        return {"session_id": session_id, "ended": True}

    @app.post("/v1/completions", response_class=JSONResponse, responses=S.generation_responses(S.Completion))
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(state, request, body, chat=False)

    @app.post("/v1/chat/completions", response_class=JSONResponse, responses=S.generation_responses(S.ChatCompletion))
    async def chat_completions(body: ChatRequest, request: Request):
        return await _serve(state, request, body, chat=True)

    return app


def _validation_error(errors: list[dict]) -> ApiError:
    """One 400 for pydantic's errors: an unsupported parameter's if there is one, else the closest one's."""
    for e in errors:
        path = _field_path(e)
        at = next((i for i, p in enumerate(path) if p in UNSUPPORTED), None)
        if at is not None:  # named up to the parameter: "response_format", not "response_format.type"
            return ApiError(UNSUPPORTED[path[at]], param=".".join(path[: at + 1]))
    first = _closest_error(errors)
    if first.get("type") == "json_invalid":
        return ApiError("malformed JSON body: " + first.get("msg", ""))
    loc = ".".join(_field_path(first))
    return ApiError(f"{loc or 'body'}: {first.get('msg', 'invalid')}", param=loc or None)


def _field_path(error: dict) -> list[str]:
    """The field an error is about: union branches (pydantic's "list[int]", "constrained-str", "str") and
    trailing list indices dropped, so "prompt.list[int].2" and "stop_token_ids.0" read "prompt" and
    "stop_token_ids"."""
    path = [p for p in error.get("loc", ()) if p != "body" and not _is_union_branch(p)]
    while path and isinstance(path[-1], int):
        path.pop()
    return [str(p) for p in path]


def _is_union_branch(part) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))


def _closest_error(errors: list[dict]) -> dict:
    """The error of the union branch that got furthest (the deepest location; a bound missed before a
    wrong type), so that [true, 2] as a prompt reads "a valid integer", not "a valid string"."""
    if not errors:
        return {}
    depth = max(len(e.get("loc", ())) for e in errors)
    deepest = [e for e in errors if len(e.get("loc", ())) == depth]
    return next((e for e in deepest if not e.get("type", "").endswith("_type")), deepest[0])


def _check_model(state: GatewayState, model: str | None) -> None:
    if model is not None and model not in (state.model_name, "default"):
        raise ApiError(
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _encode_prompts(state: GatewayState, body, chat: bool) -> list[list[int]]:
    tok = state.tokenizer
    if chat:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError("this model has no chat template; use /v1/completions", param="messages")
        messages = [R.message_dict(m) for m in body.messages]
        try:
            text = tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                **(body.chat_template_kwargs or {}),
            )
        except Exception as exc:  # a template can raise anything (jinja errors, bad roles)
            raise ApiError(f"the chat template failed on these messages: {exc}", param="messages") from None
        return [_tokenize(tok, text, False, "messages")]
    prompt = body.prompt  # never empty: the request model says so
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if tok is None:
                raise ApiError("this model has no tokenizer: send token ids", param="prompt")
            out.append(_tokenize(tok, p, True, "prompt"))
        else:
            out.append([int(t) for t in p])
    return out


def _tokenize(tok, text: str, special: bool, param: str) -> list[int]:
    try:
        text.encode("utf-8")  # lone surrogates are valid JSON but not text
        return list(tok.encode(text, add_special_tokens=special))
    except (TypeError, ValueError, UnicodeError) as exc:
        raise ApiError(f"the {param} is not valid text: {exc}", param=param) from None


def _check_lengths(state: GatewayState, prompts: list[list[int]], max_tokens: int | None, stop_token_ids=None) -> None:
    limit = state.max_model_len
    vocab = state.vocab_size
    if any(t >= vocab for t in stop_token_ids or ()):
        raise ApiError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
    for ids in prompts:
        if not ids:
            raise ApiError("the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ApiError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
            raise ApiError(
                f"this model's maximum context length is {limit} tokens; the request has "
                f"{len(ids)} prompt tokens and asks for {max_tokens or 'at least 1'} more",
                param="max_tokens" if len(ids) < limit else "prompt",
                code="context_length_exceeded",
            )


async def _serve(state: GatewayState, request: Request, body, chat: bool):
    _check_model(state, body.model)
    max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
    if not chat and max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        if body.best_of not in (None, body.n):  # best-of-n ranking is not implemented
            raise ApiError(f"best_of must equal n ({body.n}): the server returns every choice", param="best_of")
        logprobs = body.logprobs
    params = sampling_params(body, max_tokens, logprobs)
    prompts = _encode_prompts(state, body, chat)
    _check_lengths(state, prompts, max_tokens, body.stop_token_ids)
    session = body.session_id or request.headers.get("x-session-id")
    choices: list[Choice] = []
    replicas: list[int] = []  # the core each prompt went to: the x-tandem-replica header
    try:
        for i, ids in enumerate(prompts):
            core = state.router.route(ids, session, body.cache_salt)  # a prompt's n choices go together
            replicas.append(core.index)
            for k in range(body.n):
                choices.append(
                    Choice(
                        core,
                        state.outputs,
                        i * body.n + k,
                        ids,
                        params.for_choice(k),
                        session_id=session,
                        namespace=body.cache_salt,
                        priority=body.priority,
                        metrics=state.metrics,
                        prompt_index=i,
                    )
                )
    except CoreDied as exc:
        _abort(choices)
        raise ApiError(str(exc), status=503, kind="server_error") from None
    except BaseException:
        _abort(choices)  # what was sent must not run on
        raise
    meta = R.Meta(
        ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        int(time.time()),
        state.model_name,
        chat,
        state.tokenizer,
        body.return_token_ids,
    )
    headers = {REPLICA_HEADER: ",".join(map(str, replicas))}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(R.stream(meta, choices, usage), media_type="text/event-stream", headers=headers)
    return JSONResponse(await _complete(request, meta, choices), headers=headers)


def _abort(choices: list[Choice]) -> None:
    """Ends choices sent before their request failed: aborted in the core, counted, their queues released."""
    for c in choices:
        if c.client.dead:
            c.release()
        else:
            c.close()


async def _complete(request: Request, meta, choices: list[Choice]) -> dict:
    """Runs every choice to its end (its output gathers in its record); a client that disconnects aborts all."""

    async def run(choice: Choice):
        async for _ in choice.deltas():
            pass

    tasks = [asyncio.create_task(run(c)) for c in choices]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.5)
            for t in done:
                t.result()  # re-raises ApiError / CoreDied
            if pending and await request.is_disconnected():
                for c in choices:
                    c.disconnected = True
                break
    except CoreDied as exc:
        raise ApiError(f"{exc} while serving this request", status=503, kind="server_error") from None
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for c in choices:
            c.close()
    return R.full_response(meta, choices)


__all__ = ["GatewayState", "create_app"]
