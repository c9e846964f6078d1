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
from engine.core import EngineCore, finish_reason
from engine.detokenize import IncrementalDetokenizer, StopMatcher
from engine.sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None        # "stop" | "length"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None   # per token: {token id: logprob}, sampled token first
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


@dataclass
class _Pending:
    index: int
    params: SamplingParams
    prompt: str | None
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    done: CompletionOutput | None = None
    cached: int = 0
    stop: StopMatcher | None = None          # set when the params have stop strings (and there is a tokenizer)
    detok: IncrementalDetokenizer | None = None


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
        """Stops publishing KV events (what is queued is sent first, its sockets closed)."""
        self.engine.close()

    # Inputs --------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids "
                                 "({'prompt_token_ids': [...]})")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return None, [int(t) for t in prompt]
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (strings, token-id lists or {"prompt_token_ids": ...} dicts)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        params = self._params_per_prompt(sampling_params, len(encoded))
        return self._run(encoded, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encoded = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
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
        engine = self.engine
        pending: dict[int, _Pending] = {}
        groups: list[list[int]] = []
        for (text, ids), p in zip(encoded, params):
            group = []
            for k in range(p.n):
                req_id = next(self._ids)
                engine.add_request(req_id, ids, p.for_choice(k))
                pending[req_id] = entry = _Pending(k, p, text, ids)
                if p.stop_list and self.tokenizer is not None:
                    entry.stop = StopMatcher(p.stop_list, p.include_stop_str_in_output)
                    entry.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
                group.append(req_id)
            groups.append(group)
        bar = _progress(len(pending), use_tqdm)
        live = set(pending)
        while live:
            out = engine.step()
            self._collect(out, pending, live, bar)
        bar.close()
        return [self._request_output(g, pending) for g in groups]

    def _collect(self, out, pending: dict[int, _Pending], live: set, bar) -> None:
        result = self.engine.runner.last_result
        for k, (rid, token) in enumerate(zip(out.req_ids.tolist(), out.tokens.tolist())):
            p = pending.get(rid)
            if p is None or rid not in live:
                continue
            p.tokens.append(int(token))
            if p.stop is not None and p.stop.stopped is None:
                p.stop.push(p.detok.add(int(token)))
            if p.params.logprobs is not None and result is not None and result.logprobs is not None:
                entry = {int(token): float(result.logprobs[k])}
                if result.top_ids is not None and p.params.logprobs > 0:
                    for t, lp in zip(result.top_ids[k, :p.params.logprobs].tolist(),
                                     result.top_logprobs[k, :p.params.logprobs].tolist()):
                        entry.setdefault(int(t), float(lp))
                p.logprobs.append(entry)
        for f in out.finished:
            p = pending[f.request_id]
            p.cached = f.num_cached_tokens
            if f.request_id in live:
                stop_token = p.tokens[-1] if f.finish_reason == "stop" and p.tokens else None
                self._finish(f.request_id, p, finish_reason(f), live, bar, stop_reason=stop_token)
        for rid in [r for r in live if pending[r].stop is not None and pending[r].stop.stopped is not None]:
            p = pending[rid]
            p.text = p.stop.text  # up to the stop string (through it with include_stop_str_in_output)
            self.engine.abort(rid)
            self._finish(rid, p, "stop", live, bar, stop_reason=p.stop.stopped, text_ready=True)

    def _finish(self, rid: int, p: _Pending, reason: str, live: set, bar, stop_reason=None,
                text_ready: bool = False) -> None:
        live.discard(rid)  # the engine forgot it already: on its finish, or on the abort of a stop string
        text = p.text if text_ready else self._decode(p.tokens, p.params)
        cumulative = sum(next(iter(e.values())) for e in p.logprobs) if p.logprobs else None
        p.done = CompletionOutput(p.index, text, list(p.tokens), reason, stop_reason,
                                  p.logprobs if p.params.logprobs is not None else None, cumulative)
        bar.update(1)

    def _decode(self, tokens: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)

    def _request_output(self, group: list[int], pending: dict[int, _Pending]) -> RequestOutput:
        first = pending[group[0]]
        return RequestOutput(str(group[0]), first.prompt, first.prompt_ids, [pending[r].done for r in group],
                             True, first.cached)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total < 16:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", mininterval=0.5)
