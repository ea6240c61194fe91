"""Denoising batches (BART's text infilling): Poisson span lengths, exactly the noise density hidden in every window,
one [MASK] per span, the whole window as the target, and noise that is a pure function of (seed, step, global
micro-batch), so a resumed run replays it and ranks draw their own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.data.denoising import Infilling, span_lengths
from lmforge.data.loader import TokenShard
from lmforge.data.masking import EvalBatches, MaskedBatchSampler
from lmforge.data.seq2seq import Seq2SeqTokens

TOKENS = Seq2SeqTokens(eos=0, pad=100, mask=101)
INFILLING = Infilling(TOKENS, block_size=100)  # windows of 99 tokens: round(0.3 x 99) = 30 hidden


def _windows(rng: np.random.Generator, shape=(64, 99)) -> np.ndarray:
    w = rng.integers(1, 100, shape)
    w[:, ::25] = 0  # document separators (end-of-text): ordinary tokens of the stream here
    return w


def _masks_per_gap(source: np.ndarray, hidden: np.ndarray) -> tuple[list[int], list[bool]]:
    """(the [MASK]s before each kept token and after the last, whether tokens are hidden there) for one window."""
    counts, n = [0], 0
    for token in source:
        if token == TOKENS.mask:
            counts[-1] += 1
        else:
            counts.append(0)
            n += 1
    kept = np.concatenate([[-1], np.flatnonzero(~hidden), [len(hidden)]])
    assert n == len(kept) - 2
    return counts, list(np.diff(kept) > 1)


def test_span_lengths_are_poisson_and_add_up_to_the_budget():
    rng = np.random.default_rng(0)
    for budget in (1, 2, 7, 30, 77):
        for _ in range(50):
            lengths = span_lengths(budget, 3.0, rng)
            assert lengths.sum() == budget and lengths[-1] >= 1 and (lengths >= 0).all()
    # One long draw: all but the last (cut) length are Poisson(3) draws, ~33,000 of them (the stopping rule biases
    # them by about one draw's worth in 33,000: nothing). The mean's standard deviation is sqrt(3 / n) = 0.0095;
    # the share of empty spans (insertions) is e^-3 = 0.050, its standard deviation sqrt(p (1 - p) / n) = 0.0012.
    drawn = span_lengths(100_000, 3.0, np.random.default_rng(1))[:-1]
    n = len(drawn)
    p0 = math.exp(-3)
    assert abs(drawn.mean() - 3) < 4 * math.sqrt(3 / n), drawn.mean()
    assert abs((drawn == 0).mean() - p0) < 4 * math.sqrt(p0 * (1 - p0) / n), (drawn == 0).mean()


def test_every_window_hides_exactly_the_noise_density_each_span_one_mask():
    rng = np.random.default_rng(2)
    windows = _windows(rng, (400, 99))
    insertions = spans = 0
    for window in windows:
        source, hidden = INFILLING.corrupt(window, rng)
        # Exactly N = round(0.3 x 99) tokens hidden in each window (the last span is cut to the budget): the share is
        # no estimate with a spread but the same 30 of 99 every time.
        assert hidden.sum() == 30
        assert (source[source != TOKENS.mask] == window[~hidden]).all()  # the rest kept, in order
        counts, runs = _masks_per_gap(source, hidden)
        for count, run in zip(counts, runs, strict=True):
            assert count == 1 if run else count in (0, 1)  # one [MASK] per span; an empty span inserts one
        insertions += sum(c == 1 and not r for c, r in zip(counts, runs, strict=True))
        spans += sum(counts)
        assert len(source) <= len(window)
    # About 30 / 3 = 10 spans a window (a few more: the last is cut), ~e^-3 of them empty: ~5% insertions.
    assert 9 * 400 < spans < 13 * 400 and 0.02 < insertions / spans < 0.09, (spans, insertions)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6, 0.95])
def test_a_corrupted_window_fits_whatever_the_window_and_density(density):
    rng = np.random.default_rng(3)
    infilling = Infilling(TOKENS, block_size=8, density=density, mean_span=1.0)  # many empty spans
    for length in range(1, 40):
        for _ in range(20):
            window = rng.integers(1, 100, length)
            source, hidden = infilling.corrupt(window, rng)
            assert hidden.sum() == infilling.hidden_per_window(length) >= 1
            assert 1 <= len(source) <= length
            assert (source[source != TOKENS.mask] == window[~hidden]).all()


def test_a_batch_frames_the_corrupted_window_as_source_and_the_whole_window_as_target():
    windows = _windows(np.random.default_rng(4), (16, 99))
    src, src_mask, tgt, labels = INFILLING.apply(windows, np.random.default_rng(5))
    assert src.shape == src_mask.shape == tgt.shape == labels.shape == (16, 100)  # static: one compiled graph
    assert torch.equal(labels, torch.cat([torch.from_numpy(windows), torch.zeros(16, 1, dtype=torch.long)], 1))
    assert torch.equal(tgt, torch.cat([torch.zeros(16, 1, dtype=torch.long), torch.from_numpy(windows)], 1))
    for row in range(16):
        n = int(src_mask[row].sum())
        assert src_mask[row, :n].all() and src[row, n - 1] == TOKENS.eos  # the source, then end-of-text
        assert (src[row, n:] == TOKENS.pad).all()
        assert (src[row, :n] == TOKENS.mask).sum() >= 1


@pytest.fixture
def shard(tmp_path) -> TokenShard:
    np.random.default_rng(6).integers(1, 100, 5000).astype(np.uint16).tofile(tmp_path / "train.bin")
    return TokenShard(tmp_path, "train", "uint16", 32, vocab_size=102)


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_noise_is_a_function_of_seed_step_and_global_micro_batch(shard):
    infilling = Infilling(TOKENS, block_size=32)
    one = MaskedBatchSampler(shard, 4, 7, infilling)
    again = MaskedBatchSampler(shard, 4, 7, infilling)
    assert _same(one.batch(3, 1), again.batch(3, 1))  # a resumed run draws what the uninterrupted one drew
    assert not _same(one.batch(3, 1), one.batch(4, 1))  # each step afresh
    rank0, rank1 = (MaskedBatchSampler(shard, 4, 7, infilling, rank, 2) for rank in (0, 1))
    assert not _same(rank0.batch(3), rank1.batch(3))  # each rank its own
    # Global micro-batch j = micro x world + rank: rank 1 of 2 draws what one process draws for its micro-batch 1.
    assert _same(rank1.batch(3, 0), one.batch(3, 1)) and _same(rank0.batch(3, 1), one.batch(3, 2))
    # The same windows as a decoder would read, noised: only the noise depends on the objective.
    windows = shard.windows(one.offsets(3, 1))[0][:, :31]
    assert torch.equal(one.batch(3, 1)[3][:, :31], windows)


def test_validation_noise_is_the_same_at_every_evaluation(shard):
    infilling = Infilling(TOKENS, block_size=32)
    first, later = (EvalBatches(shard, infilling, 4, 3, seed=7) for _ in range(2))
    assert len(first) == 3
    assert all(_same(first[i], later[i]) for i in range(3))
    assert not _same(first[0], EvalBatches(shard, infilling, 4, 3, seed=8)[0])
