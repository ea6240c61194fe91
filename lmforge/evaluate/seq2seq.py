"""An encoder-decoder's target loss: the mean negative log-likelihood (and perplexity) of each pair's target tokens,
its end-of-text included, given its source.

Pairs come from JSONL/CSV records of a ``prompt`` (the source) and a ``reference`` (the target), the fields
``lmforge app`` writes, framed as :mod:`lmforge.data.seq2seq` frames them for every seq2seq command. Fine-tuning's
validation (``task=seq2seq``) and ``lmforge eval`` on a seq2seq run both compute the figure here, so the two report
the same number for the same checkpoint and file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.data.records import BadRecord, read_records, require
from lmforge.data.seq2seq import Seq2SeqTokens, collate_pairs, encode_pairs
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.tasks import file_sha256
from lmforge.runtime import Runtime, eval_mode
from lmforge.training.metrics import perplexity

SOURCE_FIELD = "prompt"
"""The field holding a pair's source (what the encoder reads)."""
TARGET_FIELD = "reference"
"""The field holding a pair's target (what the decoder learns to write)."""


def pair_reader(source_field: str = SOURCE_FIELD,
                target_field: str = TARGET_FIELD) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """A record -> (source, target) converter for :func:`~lmforge.data.records.read_records`; BadRecord for a
    missing, non-text or blank field (a blank target teaches nothing but to stop; a blank source gives the decoder
    nothing to read)."""

    def convert(record: dict[str, Any]) -> tuple[str, str]:
        texts = []
        for name, what in ((source_field, "the source text"), (target_field, "the target text")):
            if name not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise BadRecord(f"missing field '{name}': expected {what} (fields: {fields})")
            value = require(record, name)
            if not value.strip():
                raise BadRecord(f"field '{name}' is empty: expected {what}")
            texts.append(value)
        return texts[0], texts[1]

    return convert


@dataclass
class EncodedPairs:
    """Pairs framed for an encoder-decoder, and what framing cut."""

    sources: list[list[int]]
    """Each source's ids, then end-of-text."""
    targets: list[tuple[list[int], list[int]]]
    """Each target's (decoder input, labels)."""
    cut_sources: int
    cut_targets: int
    pad: int
    """The id that pads a batch of them."""

    def truncation_warning(self, block_size: int, where: str) -> str | None:
        """The one line that counts what truncation cut (None when nothing was), ``where`` naming the pairs: a
        summary's source is routinely longer than the context, so pairs are truncated (the beginning kept) rather
        than refused."""
        if not self.cut_sources and not self.cut_targets:
            return None
        n = len(self.sources)
        return (f"{where}: {self.cut_sources} of {n} sources and {self.cut_targets} of {n} targets are longer than "
                f"{block_size} tokens with their end-of-text: truncated, each keeping its beginning")


def encode_checked(tokenizer: Tokenizer, pairs: list[tuple[str, str]], block_size: int, vocab_size: int,
                   model: str) -> EncodedPairs:
    """(source, target) texts framed by :func:`~lmforge.data.seq2seq.encode_pairs`, each side cut to
    ``block_size``; UserError unless the model (named ``model``) has rows for the framing's special ids."""
    tokens = Seq2SeqTokens.of(tokenizer)
    if max(tokens.eos, tokens.pad, tokens.mask) >= vocab_size:
        raise UserError(f"{model}: its tokenizer has no [PAD] and [MASK] among the model's {vocab_size} tokens "
                        f"(they would be ids {tokens.pad} and {tokens.mask}): an encoder-decoder's vocabulary must "
                        f"hold them")
    sources, targets, cut_sources, cut_targets = encode_pairs(tokenizer, [s for s, _ in pairs],
                                                              [t for _, t in pairs], block_size, tokens)
    assert targets is not None  # targets were given
    return EncodedPairs(sources, targets, cut_sources, cut_targets, tokens.pad)


@torch.no_grad()
def target_nll(model: torch.nn.Module, sources: list[list[int]], targets: list[tuple[list[int], list[int]]],
               pad: int, rt: Runtime, batch_size: int) -> tuple[float, int]:
    """(the summed negative log-likelihood in nats, the number of target tokens) of framed pairs: every target token
    and its end-of-text scored once; the sources and the padding carry no loss."""
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(sources), batch_size):
            src, src_mask, tgt, labels = (t.to(rt.device) for t in collate_pairs(
                sources[i:i + batch_size], targets[i:i + batch_size], pad))
            n = int((labels != -100).sum())
            with rt.autocast():
                loss = model(src, tgt, labels, src_mask=src_mask)[1]
            total += float(loss) * n
            count += n
    return total, count


def score_pairs(model: torch.nn.Module, tokenizer: Tokenizer, path: str, rt: Runtime, batch_size: int = 8) -> dict:
    """``lmforge eval`` on a seq2seq run: target loss and perplexity over the prompt/reference records of ``path``
    (pairs longer than the context truncated as fine-tuning truncates them, with a warning counting them)."""
    pairs = [p for p, _ in read_records(path, pair_reader(), skip_bad_lines=False)]
    block = model.cfg.block_size
    encoded = encode_checked(tokenizer, pairs, block, model.cfg.vocab_size, f"'{path}'")
    warning = encoded.truncation_warning(block, f"'{path}'")
    if warning:
        warnings.warn(warning, stacklevel=2)
    nll, n = target_nll(model, encoded.sources, encoded.targets, encoded.pad, rt, batch_size)
    loss = nll / n
    return {"loss": loss, "perplexity": perplexity(loss), "target_tokens": n, "examples": len(pairs),
            "sources_truncated": encoded.cut_sources, "targets_truncated": encoded.cut_targets, "file": path,
            "data_sha256": file_sha256(path)}
