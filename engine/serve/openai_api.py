"""OpenAI request bodies (pydantic), their validation, and their mapping to SamplingParams.

Unknown fields are ignored, as OpenAI's and vLLM's servers do; out-of-range values, and known
parameters the engine cannot honour (UNSUPPORTED), are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, parameter."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Integers travel to the engine core as 64-bit (seeds) or 32-bit values: bound them here, so an
# out-of-range number is a 400 naming its field rather than an overflow deep inside. Every range the
# server enforces is a Field constraint, so /openapi.json states it.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
# Token ids are strict (pydantic would read true as id 1); the gateway checks them against the vocabulary.
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
NoneOnly = Annotated[list[dict[str, Any]], Field(max_length=0)]

# Parameters the engine cannot honour: the schema admits only their no-op values, and the 400 says why.
UNSUPPORTED = {
    "echo": "echo is not supported (the engine does not return prompt tokens)",
    "suffix": "suffix (insertion) is not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": 'response_format other than {"type": "text"} is not supported',
    "tools": "tools are not supported",
    "tool_choice": 'tool_choice other than "none" is not supported (tools are not)',
    "tool_calls": "messages with tool_calls are not supported (tools are not)",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(ge=1, le=2**31 - 1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=2**31 - 1)]] = None
    min_p: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    seed: Optional[Int64] = None
    stop: Union[Text, list[Text], None] = None
    stop_token_ids: Optional[list[TokenId]] = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    session_id: Optional[str] = None
    cache_salt: Optional[str] = None
    priority: Int32 = 0
    user: Optional[str] = None
    return_token_ids: bool = False  # vLLM's extension: each choice also carries its token ids
    logit_bias: Optional[Annotated[dict[str, float], Field(max_length=0)]] = None


class CompletionRequest(_Sampling):
    # token ids first: a refused prompt's error then names the closest branch (see gateway.validation_error)
    prompt: Union[
        TokenIds, Annotated[list[TokenIds], Field(min_length=1)], Text, Annotated[list[Text], Field(min_length=1)]
    ]
    logprobs: Optional[TopLogprobs] = None
    echo: Literal[False] = False
    suffix: Optional[Literal[""]] = None
    best_of: Optional[Annotated[int, Field(ge=1, le=16)]] = Field(None, description="only equal to n")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message with its text: tool calls, images and audio are refused, not dropped."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart]]
    tool_calls: Optional[NoneOnly] = None


class ResponseFormat(BaseModel):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Annotated[int, Field(ge=1, le=2**31 - 1)]] = None
    logprobs: bool = False
    top_logprobs: Optional[TopLogprobs] = Field(None, description="needs logprobs: true")
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[NoneOnly] = None
    tool_choice: Optional[Literal["none"]] = None


_PARAM_NAMES = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def sampling_params(req: _Sampling, max_tokens: int | None, logprobs: int | None):
    """The engine's SamplingParams for one choice (n is expanded by the caller)."""
    from engine.sampling import SamplingParams

    values: dict[str, Any] = {k: getattr(req, k) for k in _PARAM_NAMES if getattr(req, k) is not None}
    if values.get("top_k") == -1:
        values["top_k"] = 0
    values["max_tokens"] = max_tokens
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise ApiError(
            f"min_tokens ({req.min_tokens}) must not exceed the token limit ({max_tokens})", param="min_tokens"
        )
    values["logprobs"] = logprobs
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        param = str(exc).split(" ", 1)[0]
        raise ApiError(str(exc), param=param) from None
    return params
