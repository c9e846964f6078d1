"""engine/output.py, the one output processor of `LLM` and the server: stop strings across token and
character boundaries, the logprobs each request asked for, finish reasons; without a model, then through
the engine (a tiny random model) where `LLM` and the server must agree."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.output import Delta, Finished, OutputProcessor, StepOutput
from engine.sampling import SamplingParams

from test_serve_detokenize import PieceTokenizer

E_ACUTE = "é".encode()
# token ids: 0 "a", 1 "!", 2 and 3 the two bytes of "é", 4 "b", 5 "hel", 6 "lo"
PIECES = [b"a", b"!", E_ACUTE[:1], E_ACUTE[1:], b"b", b"hel", b"lo"]


def params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=64, **kw)


def step(rows, finished=(), logprobs=None, top_ids=None, top_logprobs=None) -> StepOutput:
    """A StepOutput of (request id, token) rows, in plan order."""
    ids = np.asarray([r for r, _ in rows], dtype=np.int64)
    tokens = np.asarray([t for _, t in rows], dtype=np.int64)
    arrays = [None if a is None else np.asarray(a) for a in (logprobs, top_ids, top_logprobs)]
    return StepOutput(ids, tokens, list(finished), 0.0, *arrays)


def finished(rid: int, reason: str = "length", stop_token=None, cached: int = 0, n_out: int = 0) -> Finished:
    return Finished(rid, reason, stop_token, 3, cached, n_out)


# Stop strings --------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_ending_inside_a_split_character_stops_when_the_character_is_whole(include):
    # "!é": "!" is held back (it could begin the stop string) while "é" arrives in two byte tokens; the
    # stop string is seen only once its last character decodes, at token 3; token 4 was in flight
    outputs = OutputProcessor(PieceTokenizer(PIECES))
    r = outputs.add(7, params(stop=["!é"], include_stop_str_in_output=include), 3)
    deltas = [outputs.on_token(7, t) for t in (0, 1, 2, 3, 4)]
    assert [d.text if d else None for d in deltas] == ["", "a", "", "!é" if include else "", None]
    assert [d.tokens for d in deltas[:4]] == [[0], [1], [2], [3]]  # every output token carried once
    assert r.stop.stopped == "!é" and r.finish_reason is None  # until the engine says it ended
    last = outputs.finish(finished(7, "abort", cached=2))
    assert last == Delta("", finish_reason="stop")
    assert (r.text, r.tokens, r.finish_reason, r.stop_reason) == ("a!é" if include else "a", [0, 1, 2, 3], "stop", "!é")
    assert r.num_cached_tokens == 2 and 7 not in outputs.requests


def test_text_held_back_for_a_stop_string_is_released_at_the_end():
    outputs = OutputProcessor(PieceTokenizer(PIECES))
    r = outputs.add(1, params(stop="xyz"), 3)
    assert [outputs.on_token(1, t).text for t in (5, 6)] == ["h", "el"]  # "lo" could begin "xyz"
    assert outputs.finish(finished(1, "length")) == Delta("lo", finish_reason="length")
    assert (r.text, r.finish_reason, r.stop_reason) == ("hello", "length", None)


@pytest.mark.parametrize("stream", [True, False])
def test_process_returns_the_requests_a_stop_string_ended_for_the_caller_to_abort(stream):
    outputs = OutputProcessor(PieceTokenizer(PIECES), stream=stream)
    r, other = outputs.add(1, params(stop="!é"), 3), outputs.add(2, params(), 3)
    assert outputs.process(step([(1, 0), (2, 4)])) == ([], [])
    assert outputs.process(step([(1, 1), (2, 4)])) == ([], [])
    assert outputs.process(step([(2, 4), (1, 2)])) == ([], [])
    assert outputs.process(step([(1, 3), (2, 4)])) == ([], [r])
    assert r.finish_reason is None and 1 in outputs.requests  # still running in the engine
    outputs.process(step([(1, 4), (2, 4)]))  # in flight past the stop string: not output
    assert r.tokens == [0, 1, 2, 3] and other.tokens == [4] * 5
    outputs.finish(finished(1, "abort"))
    assert (r.text, r.finish_reason, r.stop_reason) == ("a", "stop", "!é")


@pytest.mark.parametrize("stream", [True, False])
def test_a_stop_string_on_the_step_the_engine_ends_the_request_still_cuts_the_text(stream):
    # the engine ends it (max_tokens) on the very token that completes the stop string: "stop", cut there,
    # and nothing left to abort
    outputs = OutputProcessor(PieceTokenizer(PIECES), stream=stream)
    r = outputs.add(1, params(stop="!é"), 3)
    outputs.process(step([(1, 0)]))
    outputs.process(step([(1, 1)]))
    outputs.process(step([(1, 2)]))
    assert outputs.process(step([(1, 3)], [finished(1, "length", n_out=4)])) == ([r], [])
    assert (r.text, r.finish_reason, r.stop_reason, r.tokens) == ("a", "stop", "!é", [0, 1, 2, 3])
    assert not outputs.requests


@st.composite
def _pieces_and_stop(draw):
    """A text over a small alphabet (a two-byte character in it), its UTF-8 bytes cut anywhere (inside the
    character too), one piece per token, and a stop string over the same alphabet."""
    text = draw(st.text("ab,é", max_size=24))
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))) - {len(data)})
    bounds = [0, *cuts, len(data)]
    return text, [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a], draw(st.text("ab,é", min_size=1, max_size=3))


def _clean(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:  # ends inside a character
        return ""


@given(_pieces_and_stop(), st.booleans())
def test_output_is_the_text_up_to_the_first_stop_however_tokens_split_it(case, include):
    text, pieces, stop = case
    at = text.find(stop)
    want = text if at < 0 else text[: at + len(stop) if include else at]
    # the token that completes the stop string: the first after which the output so far decodes cleanly (text
    # is released only then, whole characters) and contains it
    hit = next((k for k in range(len(pieces)) if stop in _clean(b"".join(pieces[: k + 1]))), None)
    n_out = len(pieces) if hit is None else hit + 1
    for stream in (True, False):
        outputs = OutputProcessor(PieceTokenizer(pieces), stream=stream)
        r = outputs.add(0, params(stop=stop, include_stop_str_in_output=include), 1)
        deltas = [outputs.on_token(0, t) for t in range(len(pieces))]
        assert [d is not None for d in deltas] == [k < n_out for k in range(len(pieces))]
        last = outputs.finish(finished(0, "abort" if hit is not None else "length"))
        assert r.text == want and r.tokens == list(range(n_out))
        assert (r.finish_reason, r.stop_reason) == (("stop", stop) if hit is not None else ("length", None))
        if stream:  # the deltas' text, each token's id once, then the held-back tail
            assert "".join(d.text for d in deltas[:n_out]) + last.text == want
            assert [t for d in deltas[:n_out] for t in d.tokens] == r.tokens


# Text without stop strings -------------------------------------------------------------------


def test_offline_text_is_decoded_once_at_the_end_and_streamed_text_as_it_comes():
    # LLM (stream=False) decodes the whole output at its end (an unfinished character shows as U+FFFD), and
    # decodes nothing per token; the server's text is what was streamed (an unfinished character is not)
    tok = PieceTokenizer(PIECES)
    offline = OutputProcessor(tok, stream=False)
    r = offline.add(1, params(), 3)
    offline.process(step([(1, 0)]))
    offline.process(step([(1, 2)], [finished(1, "length")]))
    assert r.detok is None and len(tok.calls) == 1 and r.text == "a\ufffd"
    streamed = OutputProcessor(PieceTokenizer(PIECES))
    s = streamed.add(1, params(), 3)
    assert [streamed.on_token(1, t).text for t in (0, 2)] == ["a", ""]
    assert streamed.finish(finished(1, "length")).text == "" and s.text == "a"


def test_special_tokens_are_skipped_in_text_but_not_in_tokens():
    tok = PieceTokenizer([b"hi", b"!"], special={2: "<|im_end|>"})
    for skip, want in ((True, "hi!"), (False, "hi<|im_end|>!")):
        for stream in (True, False):
            outputs = OutputProcessor(tok, stream=stream)
            r = outputs.add(1, params(skip_special_tokens=skip), 3)
            outputs.process(step([(1, 0)]))
            outputs.process(step([(1, 2)]))
            outputs.process(step([(1, 1)], [finished(1, "length")]))
            assert (r.text, r.tokens) == (want, [0, 2, 1])


def test_without_a_tokenizer_text_is_empty_and_stop_strings_never_match():
    for stream in (True, False):
        outputs = OutputProcessor(None, stream=stream)
        r = outputs.add(1, params(stop="a"), 3)
        assert outputs.process(step([(1, 0)])) == ([], [])
        outputs.process(step([(1, 0)], [finished(1, "stop", stop_token=0)]))
        assert (r.text, r.tokens, r.finish_reason, r.stop_reason) == ("", [0, 0], "stop", 0)


# Logprobs and finish reasons -----------------------------------------------------------------


def test_each_request_keeps_the_logprobs_it_asked_for():
    # a step computes logprobs for every row, and the top ones as many as the most any row asked for
    outputs = OutputProcessor(None)
    none, zero, two = (outputs.add(i, params(logprobs=n), 3) for i, n in enumerate((None, 0, 2)))
    top_ids = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    top_lps = [[-0.5, -1.5, -2.5], [-0.25, -1.25, -2.25], [-0.125, -1.125, -2.125]]
    outputs.process(
        step([(0, 5), (1, 9), (2, 11)], logprobs=[-0.5, -1.25, -0.125], top_ids=top_ids, top_logprobs=top_lps)
    )
    outputs.process(step([(2, 4), (1, 3), (0, 1)], logprobs=[-3.0, -2.0, -1.0]))  # no row asked for top ones
    assert (none.logprobs, none.top) == ([], [])
    assert (zero.logprobs, zero.top) == ([-1.25, -2.0], [[]])
    assert (two.logprobs, two.top) == ([-0.125, -3.0], [[(11, -0.125), (12, -1.125)]])
    d = outputs.on_token(2, 4, -0.75, [(4, -0.75), (3, -1.0), (2, -2.0)])
    assert (d.logprobs, d.top) == ([-0.75], [[(4, -0.75), (3, -1.0)]])
    assert outputs.on_token(0, 4, -0.75, [(4, -0.75)]) == Delta("", [4])


@pytest.mark.parametrize(
    "reason, stop_token, want",
    [("length", None, ("length", None)), ("stop", 9, ("stop", 9)), ("abort", None, ("stop", None))],
)
def test_finish_reasons_are_openais(reason, stop_token, want):
    outputs = OutputProcessor(None)
    r = outputs.add(1, params(), 3)
    outputs.process(step([(1, 9)], [finished(1, reason, stop_token, cached=16, n_out=1)]))
    assert (r.finish_reason, r.stop_reason, r.num_cached_tokens) == (*want, 16)


def test_requests_not_added_or_released_are_ignored():
    outputs = OutputProcessor(None)
    r = outputs.add(1, params(), 3)
    assert outputs.on_token(2, 5) is None and outputs.finish(finished(2)) is None
    assert outputs.process(step([(2, 5), (1, 6)], [finished(2)])) == ([], [])
    outputs.release(1)
    assert outputs.on_token(1, 7) is None and outputs.finish(finished(1)) is None
    assert r.tokens == [6] and r.finish_reason is None and not outputs.requests


# Through the engine: StepOutput, EngineCore's abort, and LLM -----------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from serve_helpers import TINY_TOKENIZER_SIZE, write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny")), vocab_size=TINY_TOKENIZER_SIZE)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from engine import LLM

    return LLM(tiny_dir, load_format="dummy", tokenizer=tiny_dir, device="cpu", num_gpu_blocks=128, seed=3)


def test_step_outputs_carry_logprobs_and_openai_finishes(llm):
    core = llm.engine
    core.add_request(100, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2))
    core.add_request(101, [8, 9], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    outs = []
    while core.has_unfinished():
        outs.append(core.step())
    assert all(
        o.logprobs is not None and o.logprobs.shape == o.tokens.shape and o.top_ids.shape == (len(o.tokens), 2)
        for o in outs
        if len(o.tokens)
    )
    ends = {f.req_id: f for o in outs for f in o.finished}
    assert [(ends[r].reason, ends[r].stop_token, ends[r].num_output_tokens) for r in (100, 101)] == [
        ("length", None, 3),
        ("length", None, 2),
    ]
    assert ends[100].num_prompt_tokens == 3 and ends[100].queue_time >= 0
    assert not core.runner.seqs and core.abort(100) is None  # finished: nothing to abort


def test_engine_abort_returns_the_request_s_finish(llm):
    core = llm.engine
    core.add_request(200, [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    core.step()
    core.step()
    f = core.abort(200)
    assert (f.req_id, f.reason, f.stop_token, f.num_prompt_tokens, f.num_output_tokens) == (200, "abort", None, 4, 2)
    assert core.abort(200) is None and not core.has_unfinished() and core.stats().num_aborted >= 1


def test_llm_cuts_at_a_stop_string_whether_it_or_max_tokens_ends_the_output(llm):
    # Fails on the former LLM, which gave "length" and the uncut text when the stop string completed on the
    # last token max_tokens allowed (the server cut it, as it cuts it on any other token).
    prompt = {"prompt_token_ids": [5, 6, 7]}
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    streamed = OutputProcessor(llm.get_tokenizer())  # the server's view of the same tokens
    streamed.add(0, params(), 3)
    texts = [streamed.on_token(0, t).text for t in full.token_ids]
    k = next(k for k in range(1, len(texts)) if texts[k] and "".join(texts[:k]))
    at = len("".join(texts[:k]))
    stop = full.text[at - 1 : at + 1]  # the last character of one token's text and the first of the next
    server = OutputProcessor(llm.get_tokenizer())
    want = server.add(0, params(stop=stop), 3)
    hit = next(i for i, t in enumerate(full.token_ids) if server.on_token(0, t) and want.stop.stopped)
    server.finish(Finished(0, "abort", None, 3, 0, hit + 1))
    assert want.text == full.text[: full.text.find(stop)]
    for max_tokens in (hit + 1, 24):
        out = llm.generate(
            prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop=stop), use_tqdm=False
        )[0].outputs[0]
        assert (out.text, out.token_ids, out.finish_reason, out.stop_reason) == (
            want.text,
            full.token_ids[: hit + 1],
            "stop",
            stop,
        )
    assert not llm.engine.has_unfinished()
