"""Denoising batches for an encoder-decoder: BART's text infilling (Lewis et al. 2019, section 2.2).

A window of W = block_size - 1 tokens of the token stream (documents separated by end-of-text, an
ordinary token here) is corrupted: spans with lengths drawn from Poisson(mean_span) (BART: 3) cover
N = round(density x W) of its tokens (BART: 30%), and each span becomes ONE ``[MASK]``, so the model
learns how many tokens are missing as well as which. A span of length 0 inserts a ``[MASK]`` where
nothing is missing, as BART's do. Lengths are drawn until they reach N and the last is cut to N (as
fairseq's implementation does), so every window has exactly N tokens hidden. The spans sit in
distinct gaps between kept tokens: two never touch (they would read as one ``[MASK]``).

The encoder reads the corrupted window, then end-of-text (:func:`~lmforge.data.seq2seq.frame_source`),
right-padded with ``[PAD]`` to block_size; the decoder writes the original window
(:func:`~lmforge.data.seq2seq.frame_target`: input end-of-text + window, labels window + end-of-text,
block_size tokens each). Every shape is fixed, so torch.compile traces one graph. The corrupted window
is never longer than the window: at most N spans (N ``[MASK]`` for N hidden tokens), and where the
draws give more (short windows, many 0-length spans) or more than there are gaps, the last ones merge.

The generator is the caller's: :class:`lmforge.data.masking.MaskedBatchSampler` seeds it by (seed, step,
global micro-batch), so a resumed run replays the noise and ranks draw their own, and
:class:`lmforge.data.masking.EvalBatches` by the validation batch's index, so every evaluation sees the
same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.loader import TokenShard
from lmforge.data.seq2seq import Seq2SeqTokens, collate_pairs, frame_source, frame_target


def span_lengths(budget: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(``mean``) lengths, drawn until they add up to ``budget`` or more, the last cut so that they add up to
    exactly ``budget`` (it stays at least 1: the ones before add up to less)."""
    drawn = np.zeros(0, dtype=np.int64)
    while drawn.sum() < budget:
        drawn = np.concatenate([drawn, rng.poisson(mean, size=budget)])
    total = np.cumsum(drawn)
    last = int(np.searchsorted(total, budget))  # the first draw that reaches the budget
    lengths = drawn[: last + 1].copy()
    lengths[last] = budget - (total[last - 1] if last else 0)
    return lengths


@dataclass(frozen=True)
class Infilling:
    """How denoising batches are made for one vocabulary and context (see the module docstring)."""

    tokens: Seq2SeqTokens
    block_size: int
    density: float = 0.3
    """The share of each window's tokens hidden (BART: 0.3)."""
    mean_span: float = 3.0
    """The mean of the Poisson distribution span lengths are drawn from (BART: 3)."""

    @property
    def window(self) -> int:
        """W: the tokens of the stream in one example (the decoder writes them, then end-of-text)."""
        return self.block_size - 1

    def hidden_per_window(self, length: int) -> int:
        """N: the tokens hidden in a window of ``length`` tokens (at least 1, at most all)."""
        return min(length, max(1, round(self.density * length)))

    def corrupt(self, window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(the corrupted window: kept tokens with one ``[MASK]`` per span, which of the window's tokens are hidden)
        for one window of token ids."""
        W = len(window)
        N = self.hidden_per_window(W)
        lengths = span_lengths(N, self.mean_span, rng)
        gaps = W - N + 1  # before each kept token, and after the last
        fits = min(N, gaps)
        if len(lengths) > fits:  # too many spans for the room: the last ones become one
            lengths = np.concatenate([lengths[: fits - 1], [lengths[fits - 1:].sum()]])
        slots = np.sort(rng.choice(gaps, size=len(lengths), replace=False))
        # Span i starts after slots[i] kept tokens and the spans before it: its tokens are slots[i] + (its ranks
        # among all hidden tokens).
        hidden = np.zeros(W, dtype=bool)
        hidden[np.repeat(slots, lengths) + np.arange(N)] = True
        return np.insert(window[~hidden], slots, self.tokens.mask), hidden

    def apply(self, windows: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """(src (B, block), src_mask (B, block), decoder input (B, block), labels (B, block)) for token windows
        (B, W): each corrupted as the encoder's input, and whole as the decoder's target."""
        sources, targets = [], []
        for window in windows.astype(np.int64):
            sources.append(frame_source(self.corrupt(window, rng)[0].tolist(), self.block_size, self.tokens))
            targets.append(frame_target(window.tolist(), self.block_size, self.tokens))
        return collate_pairs(sources, targets, self.tokens.pad, (self.block_size, self.block_size))

    def windows(self, shard: TokenShard, offsets: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """:meth:`apply` to the shard's windows at ``offsets``, each W = block_size - 1 tokens (room for the
        end-of-text that ends the source and the target)."""
        return self.apply(shard.windows(offsets)[0][:, : self.window].numpy(), rng)
