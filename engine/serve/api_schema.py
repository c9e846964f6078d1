"""What /openapi.json says: the response bodies, the errors each route answers, the served model's limits.

FastAPI documents a 422 the server never sends (validation errors are OpenAI's 400) and knows neither
the model's length nor its vocabulary; `openapi` fixes both, so that a client (or schemathesis) that
trusts the schema sends what the server accepts and reads what it gets.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every 4xx and 5xx has it."""

    error: ErrorDetail


class CachedTokens(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = None  # with return_token_ids only


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    vocab_size: int
    dtype: str
    kv_cache_dtype: str
    quantization: str
    idle_chunk_size: int  # Tandem's: the prefill chunk of steps no decode waits in (0: chunk_size's)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class SessionEnded(BaseModel):
    session_id: str
    ended: Literal[True]


class Health(BaseModel):
    status: Literal["ok"]


_ERROR = {"model": ErrorResponse}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def generation_responses(model: type[BaseModel]) -> dict:
    """A generation route's responses: the body (or, with stream: true, server-sent events) or a 400."""
    return {
        200: {"model": model, "content": _SSE, "description": "the completion, or its SSE stream"},
        400: {**_ERROR, "description": "an invalid or unsupported request"},
    }


SESSION_RESPONSES = {404: {**_ERROR, "description": "no such session"}}
METRICS_RESPONSES = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text exposition"}
}


def openapi(app, state) -> dict:
    """The app's schema: no 422; 401 (with an API key) and 503 where the server sends them; the served
    model's length and vocabulary as the bounds of max_tokens and token ids."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    error = {
        "description": "",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op["responses"].pop("422", None)
            if state.api_key and path != "/health":
                op["responses"]["401"] = {**error, "description": "a missing or wrong API key"}
            if path != "/metrics":
                op["responses"]["503"] = {**error, "description": "the engine core is not running"}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    if state.client.info is not None:
        for name, fields in (
            ("CompletionRequest", ("max_tokens",)),
            ("ChatRequest", ("max_tokens", "max_completion_tokens")),
        ):
            for field in fields:
                _bound_integers(components[name]["properties"][field], state.max_model_len - 1)
        for name in ("CompletionRequest", "ChatRequest"):
            props = components[name]["properties"]
            for field in ("prompt", "stop_token_ids"):
                if field in props:
                    _bound_integers(props[field], state.vocab_size - 1)
    app.openapi_schema = schema
    return schema


def _bound_integers(node, maximum: int) -> None:
    """Sets `maximum` on every integer schema under `node`."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for value in node.values():
            _bound_integers(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, maximum)
