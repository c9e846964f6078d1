"""The offline API in the shape vLLM users know.

from engine import LLM, SamplingParams
llm = LLM()                                   # the embedded default, SmolLM2-135M-Instruct
out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
out[0].outputs[0].text, out[0].outputs[0].token_ids
llm.chat([{"role": "user", "content": "What is the capital of France?"}])
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.output import OutputProcessor, RequestState
from engine.sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, sampled token first
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class LLM:
    """An engine for offline batches.

    Args:
        model: a Hugging Face directory, a .gguf file, or a built-in shape with load_format="dummy";
            "" (default) is the embedded SmolLM2-135M-Instruct.
        loaded: reuse an already loaded model (engine.loader.LoadedModel), e.g. across test configurations.
        **kwargs: any EngineConfig field (dtype, device, num_gpu_blocks, enforce_eager, ...).
    """

    def __init__(self, model: str = "", *, loaded=None, **kwargs: Any) -> None:
        self.config = EngineConfig.from_dict({"model": model, **kwargs})
        self.engine = EngineCore(self.config, loaded=loaded)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def close(self) -> None:
        """Stops publishing KV events (what is queued is sent first, its sockets closed) and the other
        tensor-parallel ranks."""
        self.engine.close()

    # Inputs --------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids ({'prompt_token_ids': [...]})")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def generate(
        self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Generates for every prompt (strings, token-id lists or {"prompt_token_ids": ...} dicts)."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        params = self._params_per_prompt(sampling_params, len(encoded))
        return self._run(encoded, params, use_tqdm)

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encoded = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            encoded.append((text, list(self.tokenizer.encode(text, add_special_tokens=False))))
        return self._run(encoded, self._params_per_prompt(sampling_params, len(encoded)), use_tqdm)

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling params for {n} prompts")
        return params

    # The loop ------------------------------------------------------------------------------------
    def _run(self, encoded, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine, outputs = self.engine, OutputProcessor(self.tokenizer, stream=False)
        groups: list[list[RequestState]] = []
        for (_, ids), p in zip(encoded, params):
            group = []
            for k in range(p.n):
                req_id = next(self._ids)
                engine.add_request(req_id, ids, p.for_choice(k))
                group.append(outputs.add(req_id, p, len(ids)))
            groups.append(group)
        bar = _progress(len(outputs.requests), use_tqdm)
        while outputs.requests:
            ended, stopped = outputs.process(engine.step())
            for r in stopped:  # a stop string ended it: the engine runs it no further
                outputs.finish(engine.abort(r.req_id))
            bar.update(len(ended) + len(stopped))
        bar.close()
        return [
            RequestOutput(
                str(g[0].req_id), text, ids, [_completion(k, r) for k, r in enumerate(g)], True, g[0].num_cached_tokens
            )
            for (text, ids), g in zip(encoded, groups)
        ]


def _completion(index: int, r: RequestState) -> CompletionOutput:
    logprobs = None
    if r.params.logprobs is not None:  # per token: {token id: logprob}, the sampled token first
        logprobs = [{token: lp} for token, lp in zip(r.tokens, r.logprobs)]
        for entry, top in zip(logprobs, r.top):
            for t, lp in top:
                entry.setdefault(t, lp)
    cumulative = sum(r.logprobs) if r.logprobs else None
    return CompletionOutput(index, r.text, list(r.tokens), r.finish_reason, r.stop_reason, logprobs, cumulative)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", mininterval=0.5, disable=not enabled or total < 16)
