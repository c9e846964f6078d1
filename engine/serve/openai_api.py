"""OpenAI request bodies (pydantic), their validation, and their mapping to SamplingParams.

Unknown fields are ignored, as OpenAI's and vLLM's servers do; out-of-range
values are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, parameter."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Integers travel to the engine core as 64-bit (seeds) or 32-bit values: bound them here, so an
# out-of-range number is a 400 naming its field rather than an overflow deep inside.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[Int32] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[Int32] = None
    min_p: Optional[float] = None
    seed: Optional[Int64] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[TokenId]] = None
    n: Int32 = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: Int32 = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    session_id: Optional[str] = None
    cache_salt: Optional[str] = None
    priority: Int32 = 0
    user: Optional[str] = None
    return_token_ids: bool = False   # vLLM's extension: each choice also carries its token ids


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # ids range-checked by the gateway
    logprobs: Optional[Int32] = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Int32] = None
    logprobs: bool = False
    top_logprobs: Optional[Int32] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


_PARAM_NAMES = ("temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "skip_special_tokens",
                "include_stop_str_in_output")


def sampling_params(req: _Sampling, max_tokens: int | None, logprobs: int | None):
    """The engine's SamplingParams for one choice (n is expanded by the caller)."""
    from engine.sampling import SamplingParams

    values: dict[str, Any] = {k: getattr(req, k) for k in _PARAM_NAMES if getattr(req, k) is not None}
    if values.get("top_k") == -1:
        values["top_k"] = 0
    values["max_tokens"] = max_tokens
    values["logprobs"] = logprobs
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=param) from None
    return params


def chat_logprobs_entry(tokenizer, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    def one(t: int, lp: float) -> dict:
        text = tokenizer.decode([t]) if tokenizer is not None else str(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    entry = one(token, logprob)
    entry["top_logprobs"] = [one(t, lp) for t, lp in top]
    return entry
