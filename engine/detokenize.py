"""Incremental, UTF-8-safe detokenization and stop strings that may span token boundaries.

Byte-level BPE tokens can end inside a multi-byte character: decoding then
yields U+FFFD, so text is released only once it decodes cleanly. Decoding a
short window (prefix_offset..) instead of the whole output keeps each token
O(window), as vLLM does.

Stop strings: text that could still be the beginning of a stop string is held
back from the stream until the next token settles it; once one appears, the
output ends just before it (or after it, with include_stop_str_in_output).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token: int) -> str:
        """Appends one token; returns the newly complete text (possibly "")."""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""


class StopMatcher:
    """Tracks the text emitted so far against a set of stop strings."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include_stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""       # all text seen
        self.emitted = 0     # chars of `text` released to the client
        self.stopped: str | None = None

    def push(self, delta: str) -> str:
        """Adds decoded text; returns what may be released now. Sets `stopped` when a stop string appears."""
        if self.stopped is not None:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stops:
            hits = [(self.text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                at, stop = min(hits)
                self.stopped = stop
                end = at + len(stop) if self.include else at
                out, self.text = self.text[self.emitted:end], self.text[:end]
                self.emitted = end
                return out
        safe = len(self.text) - self.hold if self.stops else len(self.text)
        out = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of the output."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
