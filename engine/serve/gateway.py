"""The OpenAI-compatible HTTP gateway (FastAPI): validation, chat templates, tokenization, SSE.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics, POST /v1/sessions/{id}/end (and DELETE /v1/sessions/{id}).
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serve.client import CoreClient, CoreDied
from engine.serve.generation import Choice
from engine.serve.metrics import Metrics
from engine.serve.openai_api import ApiError, ChatRequest, CompletionRequest, sampling_params
from engine.serve import responses as R

log = logging.getLogger("tandem.gateway")


class GatewayState:
    def __init__(self, client: CoreClient, tokenizer, model_name: str, api_key: str | None) -> None:
        self.client, self.tokenizer, self.model_name, self.api_key = client, tokenizer, model_name, api_key
        self.metrics = Metrics(client)

    @property
    def max_model_len(self) -> int:
        return self.client.info.max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the engine core's): every token id it takes or generates is below it."""
        return self.client.info.vocab_size


def create_app(state: GatewayState, lifespan=None) -> FastAPI:
    app = FastAPI(title="Tandem", lifespan=lifespan)
    app.state.gateway = state

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404, 405, unparsable bodies: OpenAI's shape too
        return JSONResponse(ApiError(str(exc.detail), status=exc.status_code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        # `param` names the field: union branches (pydantic's "list[int]") and trailing list indices
        # dropped, so "prompt.list[int].2" and "stop_token_ids.0" read "prompt" and "stop_token_ids"
        path = [p for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)]
        while path and isinstance(path[-1], int):
            path.pop()
        path = [str(p) for p in path]
        loc = ".".join(path)
        kind = first.get("type", "")
        if kind == "json_invalid":
            return JSONResponse(ApiError("malformed JSON body: " + first.get("msg", "")).body(), status_code=400)
        message = f"{'.'.join(path) or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(ApiError(message, param=loc or None).body(), status_code=400)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if state.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return JSONResponse(ApiError("invalid or missing API key", status=401,
                                             kind="authentication_error").body(), status_code=401)
        if state.client.dead and request.url.path != "/metrics":
            return JSONResponse(ApiError("the engine core is not running", status=503, kind="server_error").body(),
                                status_code=503)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        # OpenAI's model object plus vLLM's max_model_len and the vocabulary, so that a client that sends
        # token ids (experiments/bench_serving.py) knows their range without being told
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "tandem", "max_model_len": state.max_model_len,
                                            "vocab_size": state.vocab_size}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/sessions/{session_id}/end")
    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str):
        state.client.end_session(session_id)
        return {"session_id": session_id, "ended": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(state, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _serve(state, request, body, chat=True)

    return app


def _check_model(state: GatewayState, model: str | None) -> None:
    if model is not None and model not in (state.model_name, "default"):
        raise ApiError(f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _encode_prompts(state: GatewayState, body, chat: bool) -> list[list[int]]:
    tok = state.tokenizer
    if chat:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError("this model has no chat template; use /v1/completions", param="messages")
        messages = [R.message_dict(m) for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                           **(body.chat_template_kwargs or {}))
        except Exception as exc:  # a template can raise anything (jinja errors, bad roles)
            raise ApiError(f"the chat template failed on these messages: {exc}", param="messages") from None
        return [_tokenize(tok, text, False, "messages")]
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError("prompt is empty", param="prompt")
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


def _check_lengths(state: GatewayState, prompts: list[list[int]], max_tokens: int | None,
                   stop_token_ids=None) -> None:
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
            raise ApiError(f"this model's maximum context length is {limit} tokens; the request has "
                           f"{len(ids)} prompt tokens and asks for {max_tokens or 'at least 1'} more",
                           param="max_tokens" if len(ids) < limit else "prompt", code="context_length_exceeded")


async def _serve(state: GatewayState, request: Request, body, chat: bool):
    _check_model(state, body.model)
    if body.n < 1 or body.n > 16:
        raise ApiError("n must be in [1, 16]", param="n")
    limit_name = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, limit_name)
    if not chat and max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(f"{limit_name} must be at least 1", param=limit_name)
    if chat:
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise ApiError("top_logprobs must be in [0, 20]", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    params = sampling_params(body, max_tokens, logprobs)
    prompts = _encode_prompts(state, body, chat)
    _check_lengths(state, prompts, max_tokens, body.stop_token_ids)
    session = body.session_id or request.headers.get("x-session-id")
    choices: list[Choice] = []
    try:
        for i, ids in enumerate(prompts):
            for k in range(body.n):
                choices.append(Choice(state.client, state.tokenizer, i * body.n + k, ids, params.for_choice(k),
                                      session_id=session, namespace=body.cache_salt, priority=body.priority,
                                      metrics=state.metrics, prompt_index=i))
    except CoreDied:
        raise ApiError("the engine core is not running", status=503, kind="server_error") from None
    except BaseException:
        state.client.abort([c.req_id for c in choices])  # what was sent must not run on
        raise
    meta = R.Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, int(time.time()), state.model_name, chat,
                  state.tokenizer, body.return_token_ids)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(R.stream(meta, choices, usage), media_type="text/event-stream")
    return JSONResponse(await _complete(request, meta, choices))


async def _complete(request: Request, meta, choices: list[Choice]) -> dict:
    """Runs every choice to its end; a client that disconnects aborts them all."""
    collected = [R.Collected() for _ in choices]

    async def run(choice: Choice, out):
        async for d in choice.deltas():
            out.add(d)

    tasks = [asyncio.create_task(run(c, o)) for c, o in zip(choices, collected)]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.5)
            for t in done:
                t.result()  # re-raises ApiError / CoreDied
            if pending and await request.is_disconnected():
                break
    except CoreDied:
        raise ApiError("the engine core died while serving this request", status=503, kind="server_error") from None
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return R.full_response(meta, choices, collected)


__all__ = ["GatewayState", "create_app"]
