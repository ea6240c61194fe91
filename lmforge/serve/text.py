"""Text in and out of the server: prompts to token ids off the event loop, generated tokens to text that is safe
to send while stop strings are watched for."""

from __future__ import annotations

import threading

from lmforge.data.tokenizer import Tokenizer
from lmforge.generate import find_stop

_ENCODING = threading.Lock()
"""One encoding at a time: ``allow_special`` is a setting of the shared tokenizer, switched around each call."""


def encode(tokenizer: Tokenizer, texts: list[str], allow_special: bool = False) -> list[list[int]]:
    """Token ids of each text, as :meth:`Tokenizer.encode` gives them; meant for a worker thread.

    ``tokenizers``' batch call releases the GIL while it works (its single-text call holds it: a 1 MB prompt would
    stop the event loop for seconds, measured), so the event loop keeps serving the other clients meanwhile.
    """
    with _ENCODING:
        if not allow_special:
            return tokenizer.encode_batch(texts)
        tokenizer.hf.encode_special_tokens = False  # as Tokenizer.encode(allow_special=True) does
        try:
            return tokenizer.encode_batch(texts)
        finally:
            tokenizer.hf.encode_special_tokens = True


def _failure(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's failure function: f[i] is the length of the longest proper prefix of stop[:i + 1]
    that is also a suffix of it."""
    f = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = f[k - 1]
        if stop[i] == stop[k]:
            k += 1
        f[i] = k
    return f


class StopPrefixes:
    """How much of the end of a growing text could still become a stop string: the longest end of the text that
    is the beginning of one of them.

    Each stop string has a Knuth-Morris-Pratt matcher fed only the characters added since the last call, so
    watching a text costs time linear in its length (testing every prefix of every stop string at every token costs
    the square of the stop strings' length per token). Should the text change behind what was fed (a decoder that
    rewrites earlier text), the matchers start again from its last characters.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.failures = [_failure(s) for s in self.stops]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.states = [0] * len(self.stops)
        self.text = ""

    def held(self, text: str) -> int:
        """Length of the longest end of ``text`` that could still grow into a stop string (0 to len - 1 of it)."""
        if not self.stops:
            return 0
        if text.startswith(self.text):
            new = text[len(self.text):]
        else:  # only the last longest - 1 characters can be the beginning of a stop string
            self.states = [0] * len(self.stops)
            new = text[-(self.longest - 1):] if self.longest > 1 else ""
        self.text = text
        for i, (stop, failure) in enumerate(zip(self.stops, self.failures, strict=True)):
            k = self.states[i]
            for c in new:
                if k == len(stop):  # a whole match last time: continue from its longest proper border
                    k = failure[k - 1]
                while k and c != stop[k]:
                    k = failure[k - 1]
                if c == stop[k]:
                    k += 1
            self.states[i] = k
        # A whole stop string at the end (find_stop's case) still holds back its longest proper border.
        return max(k if k < len(stop) else failure[k - 1]
                   for k, stop, failure in zip(self.states, self.stops, self.failures, strict=True))


class TextStream:
    """A job's tokens as text that is safe to send: never half a UTF-8 character, never text that may turn out to
    begin a stop string; ``stopped`` once a stop string appeared (the text ends before it)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.prefixes = StopPrefixes(stop)
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)  # the whole text: a token may complete a character begun earlier
        cut = find_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            ready = cut
        elif text.endswith("\ufffd"):
            return ""
        else:
            ready = len(text) - self.prefixes.held(text)
        piece, self.sent = text[self.sent:ready], max(self.sent, ready)
        return piece

    def rest(self) -> str:
        """What was held back when the job ends without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece
