"""OpenAI response bodies: whole responses, and SSE chunks for streams."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from engine.serve.client import CoreDied
from engine.serve.openai_api import ApiError


@dataclass
class Meta:
    id: str
    created: int
    model: str
    chat: bool
    tokenizer: object
    token_ids: bool = False


def message_dict(m) -> dict:
    """A ChatMessage as the chat template takes it: text parts joined (the request model admits no others)."""
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text for p in content)
    out = {k: v for k, v in m.model_dump().items() if v is not None}
    out["content"] = content
    return out


def _token_text(tokenizer, t: int) -> str:
    return tokenizer.decode([t]) if tokenizer is not None else str(t)


def completion_logprobs(meta: Meta, c, offset: int = 0) -> dict | None:
    if not c.logprobs:
        return None
    tokens = [_token_text(meta.tokenizer, t) for t in c.tokens]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": c.logprobs,
        "top_logprobs": [{_token_text(meta.tokenizer, t): lp for t, lp in top} for top in c.top] or None,
        "text_offset": offsets,
    }


def chat_logprobs(meta: Meta, c) -> dict | None:
    if not c.logprobs:
        return None

    def one(t: int, lp: float) -> dict:
        text = _token_text(meta.tokenizer, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    tops = c.top or [[] for _ in c.tokens]
    return {
        "content": [
            {**one(t, lp), "top_logprobs": [one(*x) for x in top]} for t, lp, top in zip(c.tokens, c.logprobs, tops)
        ]
    }


def usage(choices) -> dict:
    """Token counts; prompts are counted once however many choices (n) they have."""
    per_prompt: dict[int, tuple[int, int]] = {}
    for c in choices:
        tokens, cached = per_prompt.get(c.prompt_index, (0, 0))
        per_prompt[c.prompt_index] = (c.request.num_prompt_tokens, max(cached, c.request.num_cached_tokens))
    prompt = sum(t for t, _ in per_prompt.values())
    completion = sum(len(c.request.tokens) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c for _, c in per_prompt.values())},
    }


def full_response(meta: Meta, choices) -> dict:
    out = []
    for choice in choices:
        c = choice.request
        if meta.chat:
            out.append(
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(meta, c),
                    "finish_reason": c.finish_reason,
                }
            )
        else:
            out.append(
                {
                    "index": choice.index,
                    "text": c.text,
                    "logprobs": completion_logprobs(meta, c),
                    "finish_reason": c.finish_reason,
                }
            )
        if meta.token_ids:
            out[-1]["token_ids"] = c.tokens
    return {
        "id": meta.id,
        "object": "chat.completion" if meta.chat else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage(choices),
    }


def _chunk(meta: Meta, choices: list[dict], usage_block=None) -> str:
    body = {
        "id": meta.id,
        "object": "chat.completion.chunk" if meta.chat else "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }
    if usage_block is not None:
        body["usage"] = usage_block
    return f"data: {json.dumps(body)}\n\n"


def _delta_choice(meta: Meta, index: int, d, text_offset: int) -> dict:
    if meta.chat:
        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
        out = {"index": index, "delta": delta, "logprobs": chat_logprobs(meta, d), "finish_reason": d.finish_reason}
    else:
        out = {
            "index": index,
            "text": d.text,
            "logprobs": completion_logprobs(meta, d, text_offset),
            "finish_reason": d.finish_reason,
        }
    if meta.token_ids:
        out["token_ids"] = d.tokens
    return out


async def stream(meta: Meta, choices, include_usage: bool):
    """SSE: chunks from every choice as they come, then usage (if asked) and [DONE].

    With `meta.token_ids` (return_token_ids) every choice of every chunk has `token_ids`: the ids of
    the tokens it reports, whatever their text, so that their concatenation is the choice's output
    (and usage.completion_tokens counts them); without it no chunk has the key.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice):
        try:
            async for d in choice.deltas():
                await queue.put((choice, d, None))
        except (ApiError, CoreDied) as exc:
            await queue.put((choice, None, exc))
        await queue.put((choice, None, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    offsets = {c.index: 0 for c in choices}
    try:
        if meta.chat:
            first = [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in choices
            ]
            if meta.token_ids:  # every streamed choice carries the key, as in the other chunks
                for c in first:
                    c["token_ids"] = []
            yield _chunk(meta, first)
        open_choices = len(choices)
        while open_choices:
            choice, d, exc = await queue.get()
            if exc is not None:
                message = exc.message if isinstance(exc, ApiError) else str(exc)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                return
            if d is None:
                open_choices -= 1
                continue
            # A token whose text is "" for now (a special token skipped, bytes of an unfinished character,
            # text held back by a stop string, an id the tokenizer lacks) still gets its chunk when the
            # client asked for ids or logprobs: the ids of all chunks are the whole output, each id once.
            if d.text or d.finish_reason is not None or d.logprobs or (meta.token_ids and d.tokens):
                yield _chunk(meta, [_delta_choice(meta, choice.index, d, offsets[choice.index])])
                offsets[choice.index] += len(d.text)
        if include_usage:
            yield _chunk(meta, [], usage(choices))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the response stopped: its client went away
        for c in choices:
            c.disconnected = True
        raise
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in choices:
            c.close()
