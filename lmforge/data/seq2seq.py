"""How a (source, target) pair becomes an encoder-decoder's inputs: one framing for pretraining, fine-tuning,
evaluation, generation and export.

BART's: the source is its tokens then end-of-text; the decoder starts from end-of-text
(``decoder_start_token_id`` = ``eos_token_id``) and learns to write the target's tokens, then
end-of-text, where it stops. Batches are right-padded with ``[PAD]`` (appended to a vocabulary
that lacks it, as for an encoder, with ``[MASK]``, which denoising pretraining writes): the
encoder masks padded sources out, and a padded target position has label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Seq2SeqTokens:
    """The special ids an encoder-decoder reads and writes."""

    eos: int
    """End-of-text: ends every source and target, and starts the decoder."""
    pad: int
    """Pads a batch (never attended to, never a label)."""
    mask: int
    """Stands for a hidden span in denoising pretraining (BART's text infilling)."""

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Seq2SeqTokens:
        """The ids in ``tokenizer``: BART's own ``<pad>`` and ``<mask>`` where it has both (an imported BART's), else
        ``[PAD]`` and ``[MASK]``, added where it lacks them (the same ids every time)."""
        bart = [tokenizer.hf.token_to_id(t) for t in ("<pad>", "<mask>")]
        if None not in bart:
            return cls(tokenizer.eot_id, *bart)
        marks = tokenizer.encoder_tokens()
        return cls(tokenizer.eot_id, marks.pad, marks.mask)

    @property
    def decoder_start(self) -> int:
        return self.eos


def frame_source(ids: list[int], block_size: int, tokens: Seq2SeqTokens) -> list[int]:
    """The encoder's input: the first ``block_size - 1`` ids, then end-of-text."""
    return [*ids[: block_size - 1], tokens.eos]


def frame_target(ids: list[int], block_size: int, tokens: Seq2SeqTokens) -> tuple[list[int], list[int]]:
    """(decoder input, labels) for target ``ids``: end-of-text then the first ``block_size - 1`` ids, and those ids
    then end-of-text (what each position should write next)."""
    kept = ids[: block_size - 1]
    return [tokens.decoder_start, *kept], [*kept, tokens.eos]


def encode_pairs(tokenizer: Tokenizer, sources: list[str], targets: list[str] | None, block_size: int,
                 tokens: Seq2SeqTokens) -> tuple[list[list[int]], list[tuple[list[int], list[int]]] | None, int, int]:
    """(framed sources, framed targets or None, sources cut, targets cut) for texts: each side cut to fit
    ``block_size`` with its end-of-text (the beginning kept: a summary's source leads with what matters most)."""
    src_ids = tokenizer.encode_batch(sources)
    framed = [frame_source(ids, block_size, tokens) for ids in src_ids]
    cut_src = sum(len(ids) > block_size - 1 for ids in src_ids)
    if targets is None:
        return framed, None, cut_src, 0
    tgt_ids = tokenizer.encode_batch(targets)
    return (framed, [frame_target(ids, block_size, tokens) for ids in tgt_ids], cut_src,
            sum(len(ids) > block_size - 1 for ids in tgt_ids))


def pad_batch(rows: list[list[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), mask (B, L): True at real tokens) of rows right-padded with ``pad`` to ``length`` (default the
    longest row's)."""
    L = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def collate_pairs(sources: list[list[int]], targets: list[tuple[list[int], list[int]]], pad: int,
                  lengths: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """A training batch (src, src_mask, decoder input, labels) of framed pairs; padded labels are -100. ``lengths``
    (source, target) pads to fixed sizes (static shapes for torch.compile)."""
    src, src_mask = pad_batch(sources, pad, lengths and lengths[0])
    tgt, tgt_mask = pad_batch([t[0] for t in targets], pad, lengths and lengths[1])
    labels, _ = pad_batch([t[1] for t in targets], pad, lengths and lengths[1])
    return src, src_mask, tgt, labels.masked_fill(~tgt_mask, -100)
