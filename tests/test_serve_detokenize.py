"""engine.output's detokenizer and stop matcher without a model: a byte-level tokenizer made of the pieces
each test needs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.output import IncrementalDetokenizer, StopMatcher


class PieceTokenizer:
    """Token i is the byte string pieces[i]; `special` ids decode to their name unless skipped (as in HF).

    Bytes decode as UTF-8 with U+FFFD for what is incomplete, like a byte-level BPE tokenizer.
    """

    def __init__(self, pieces: list[bytes], special: dict[int, str] | None = None) -> None:
        self.pieces, self.special = pieces, special or {}
        self.calls: list[int] = []  # the length of every decoded window

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        out, pending = [], b""
        for i in ids:
            if i in self.special:
                out.append(pending.decode("utf-8", "replace"))
                pending = b""
                if not skip_special_tokens:
                    out.append(self.special[i])
            else:
                pending += self.pieces[i]
        out.append(pending.decode("utf-8", "replace"))
        return "".join(out)


def feed(tokenizer, ids, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip)
    deltas = [detok.add(i) for i in ids]
    assert detok.text == "".join(deltas)
    return deltas


# IncrementalDetokenizer ------------------------------------------------------------------------


def test_a_character_split_over_tokens_is_released_whole():
    e_acute, emoji = "é".encode(), "😀".encode()
    tok = PieceTokenizer([b"caf", e_acute[:1], e_acute[1:], b" ", emoji[:1], emoji[1:2], emoji[2:3], emoji[3:]])
    assert feed(tok, range(8)) == ["caf", "", "é", " ", "", "", "", "😀"]


def test_special_tokens_are_skipped_or_shown():
    tok = PieceTokenizer([b"hi", b"!"], special={2: "<|im_end|>"})
    assert feed(tok, [0, 2, 1]) == ["hi", "", "!"]
    assert feed(tok, [0, 2, 1], skip=False) == ["hi", "<|im_end|>", "!"]


def test_decoding_stays_on_a_short_window():
    tok = PieceTokenizer([b"a", b" b"])
    deltas = feed(tok, [0, 1] * 200)
    assert "".join(deltas) == "a b" * 200
    assert max(tok.calls) <= 3  # two decodes per token, each of the last token or two, never the whole output


@st.composite
def _split_text(draw):
    """A text and its UTF-8 bytes cut at arbitrary places (inside characters too), one piece per token."""
    text = draw(st.text(st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)), max_size=40))
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))) - {len(data)})
    bounds = [0, *cuts, len(data)]
    return text, [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@given(_split_text())
def test_incremental_text_equals_the_full_decode_and_never_shows_a_partial_character(case):
    text, pieces = case
    deltas = feed(PieceTokenizer(pieces), range(len(pieces)))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# StopMatcher -----------------------------------------------------------------------------------


def push_all(matcher: StopMatcher, deltas) -> list[str]:
    return [matcher.push(d) for d in deltas]


def test_a_stop_string_spanning_tokens_ends_the_text_before_it():
    m = StopMatcher((", 7",), include_stop=False)
    # text that could begin ", 7" (up to 2 characters) is held back until the next token settles it
    assert push_all(m, [" ", "5", ",", " ", "6", ",", " ", "7"]) == ["", "", " ", "5", ",", " ", "6", ""]
    assert m.stopped == ", 7" and m.text == " 5, 6"
    assert m.push(", 8") == "" and m.flush() == ""


def test_include_stop_str_in_output_keeps_the_stop_string():
    m = StopMatcher((", 7",), include_stop=True)
    assert "".join(push_all(m, [" 5", ", 6", ",", " 7", ", 8"])) + m.flush() == " 5, 6, 7"
    assert m.stopped == ", 7"


def test_the_earliest_stop_in_one_delta_wins():
    m = StopMatcher(("b", "abc"), include_stop=False)
    assert m.push("xabcb") == "x" and m.stopped == "abc"


def test_the_held_back_tail_is_released_at_the_end():
    m = StopMatcher(("xyz",), include_stop=False)
    assert m.push("hello") == "hel"
    assert m.flush() == "lo" and m.stopped is None


def test_without_stop_strings_nothing_is_held_back():
    for stops in ((), ("",)):
        m = StopMatcher(stops, include_stop=False)
        assert push_all(m, ["ab", "c", ""]) == ["ab", "c", ""]
        assert m.flush() == ""


@given(
    st.text("ab,", max_size=30),
    st.text("ab,", min_size=1, max_size=4),
    st.lists(st.integers(0, 30), max_size=8),
    st.booleans(),
)
def test_streamed_output_is_the_text_up_to_the_first_stop_however_it_is_split(text, stop, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopMatcher((stop,), include_stop=include)
    out = "".join(push_all(m, deltas)) + m.flush()
    at = text.find(stop)
    if at < 0:
        assert (out, m.stopped) == (text, None)
    else:
        assert out == text[: at + len(stop) if include else at] and m.stopped == stop
