"""Masked-language-model batches (BERT): which tokens are hidden, and what takes their place.

A sequence is ``[CLS]`` followed by a window of the token stream (documents separated by the
end-of-text token, ``[SEP]`` for a WordPiece vocabulary). Of its positions that hold no special
token, K = round(rate x (T - 1)) are chosen, a fixed count per sequence as in BERT's own data
pipeline (``max_predictions_per_seq``): the shapes stay static, so torch.compile traces one graph,
and the head runs on those K positions only. Of the chosen, 80% become ``[MASK]``, 10% a random
token, 10% stay as they are (the model cannot tell which tokens to trust).

Every draw comes from a generator seeded by (seed, step, micro-batch): each step masks afresh
(dynamic masking, as RoBERTa), and a resumed run replays exactly the masks the uninterrupted run
would have drawn. The validation masks are fixed (seeded by the batch's index), so evaluations
compare. The sampler and the validation batches take any :class:`Corruption` of windows: an
encoder-decoder's denoising (:class:`lmforge.data.denoising.Infilling`) is seeded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lmforge.data.loader import BatchSampler, TokenShard, eval_offsets
from lmforge.data.tokenizer import EncoderTokens

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
"""Of the chosen positions: the share replaced by [MASK], and by a random token (the rest stay)."""


class Corruption(Protocol):
    """What turns a shard's windows into a pretraining batch, drawing from a generator its caller seeds."""

    def windows(self, shard: TokenShard, offsets: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        ...


@dataclass(frozen=True)
class Masking:
    """How masked-LM batches are made for one vocabulary."""

    tokens: EncoderTokens
    vocab_size: int
    rate: float = 0.15
    """The share of a sequence's positions to predict (BERT: 0.15)."""

    def predictions_per_sequence(self, length: int) -> int:
        """K: the positions predicted in a sequence of ``length`` tokens ([CLS] included, never chosen)."""
        return max(1, round(self.rate * (length - 1)))

    def apply(self, windows: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """(inputs (B, T), positions (B, K), targets (B, K)) for token windows (B, T - 1): ``[CLS]`` + each window,
        K positions chosen and replaced as the module says; a target is -100 where a sequence had fewer than K
        ordinary tokens to choose from."""
        B = windows.shape[0]
        x = np.concatenate([np.full((B, 1), self.tokens.cls, dtype=np.int64), windows.astype(np.int64)], axis=1)
        K = self.predictions_per_sequence(x.shape[1])
        special = np.isin(x, self.tokens.special)
        # Random scores, special positions last: the K lowest are K random ordinary positions.
        scores = np.where(special, 2.0, rng.random(x.shape))
        positions = np.sort(np.argpartition(scores, K - 1, axis=1)[:, :K], axis=1)
        rows = np.arange(B)[:, None]
        targets = x[rows, positions]
        chosen_special = special[rows, positions]
        draw = rng.random(positions.shape)
        random_ids = rng.integers(0, self.vocab_size, positions.shape)
        replace = np.where(draw < MASK_SHARE, self.tokens.mask, targets)
        use_random = (draw >= MASK_SHARE) & (draw < MASK_SHARE + RANDOM_SHARE)
        use_random &= ~np.isin(random_ids, self.tokens.special)  # a special token drawn: the token stays
        replace = np.where(use_random, random_ids, replace)
        x[rows, positions] = np.where(chosen_special, targets, replace)
        targets = np.where(chosen_special, -100, targets)
        return torch.from_numpy(x), torch.from_numpy(positions), torch.from_numpy(targets)


    def windows(self, shard: TokenShard, offsets: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """:meth:`apply` to the shard's windows at ``offsets``, each one token short of the block (room for [CLS])."""
        return self.apply(shard.windows(offsets)[0][:, :-1].numpy(), rng)


class MaskedBatchSampler(BatchSampler):
    """:class:`BatchSampler`'s windows (the same offsets for the same (seed, step, micro-batch)), masked (or
    corrupted otherwise)."""

    def __init__(self, shard: TokenShard, batch_size: int, seed: int, masking: Corruption, rank: int = 0,
                 world_size: int = 1):
        super().__init__(shard, batch_size, seed, rank, world_size)
        self.masking = masking

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, 1, step, micro * self.world_size + self.rank])  # global micro-batch
        return self.masking.windows(self.shard, self.offsets(step, micro), rng)


class EvalBatches:
    """Masked batches over evenly spaced windows of a split (all of it for a huge n_batches), batch ``i`` the same at
    every evaluation (its masks seeded by ``i``)."""

    def __init__(self, shard: TokenShard, masking: Corruption, batch_size: int, n_batches: int, seed: int):
        offsets = eval_offsets(len(shard), shard.block_size, n_batches, batch_size)
        self.offsets = [offsets[i:i + batch_size] for i in range(0, len(offsets), batch_size)]
        self.shard, self.masking, self.seed = shard, masking, seed

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.masking.windows(self.shard, self.offsets[i], np.random.default_rng([self.seed, 2, i]))
