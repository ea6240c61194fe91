"""Texts given as words with one tag per word (token classification): reading such records, and tokenizing them
so that each word's first sub-token is known (where its tag is learnt and predicted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.data.records import BadRecord, require
from lmforge.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class EncodedWords:
    """One text's words as token ids, and where each word starts."""

    ids: list[int]
    """Token ids, framed ``[CLS] ... [SEP]`` for an encoder, cut to the context."""
    firsts: list[int]
    """Position in ``ids`` of each word's first sub-token, for the words that fit (the first ones)."""
    truncated: bool
    """Whether tokens were cut (the words past the cut have no position)."""


def encode_words(tokenizer: Tokenizer, words: list[str], max_len: int, framed: bool) -> EncodedWords:
    """Tokenize ``words`` (each on its own: no merge crosses two words) into at most ``max_len`` ids; BadRecord for a
    word with no token (an empty one), which could carry no tag."""
    enc = tokenizer.hf.encode(words, is_pretokenized=True, add_special_tokens=False)
    starts: dict[int, int] = {}
    for position, word in enumerate(enc.word_ids):
        starts.setdefault(word, position)
    if len(starts) < len(words):
        i = next(i for i in range(len(words)) if i not in starts)
        raise BadRecord(f"word {i} ({words[i]!r}) has no tokens")
    room = max_len - 2 if framed else max_len
    shift = 1 if framed else 0  # past [CLS]
    firsts = [starts[i] + shift for i in range(len(words)) if starts[i] < room]
    ids = enc.ids[:room]
    if framed:
        marks = tokenizer.encoder_tokens()
        ids = [marks.cls, *ids, marks.sep]
    return EncodedWords(ids, firsts, len(enc.ids) > room)


def _strings(record: dict[str, Any], name: str) -> list[str]:
    values = require(record, name, list)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise BadRecord(f"field '{name}' should be a list of strings; item {i} is a {type(v).__name__}")
    return values


def tagged_words(tokens_field: str, tags_field: str,
                 tags_required: bool = True) -> Callable[[dict[str, Any]], tuple[list[str], list[str] | None]]:
    """A record -> (words, tags), BadRecord unless both are lists of strings of one length; without
    ``tags_required`` (texts to tag) a record may have no tags (None)."""
    def convert(r: dict[str, Any]) -> tuple[list[str], list[str] | None]:
        words = _strings(r, tokens_field)
        if not words:
            raise BadRecord(f"field '{tokens_field}' has no words")
        if not tags_required and tags_field not in r:
            return words, None
        tags = _strings(r, tags_field)
        if len(tags) != len(words):
            raise BadRecord(f"{len(words)} words in '{tokens_field}' but {len(tags)} tags in '{tags_field}'")
        return words, tags

    return convert
