"""Masked-LM batches: K ordinary positions per sequence, BERT's 80/10/10 replacement, and masks that are a pure
function of (seed, step, micro-batch), so a resumed run replays them."""

import numpy as np
import torch

from lmforge.data.masking import Masking
from lmforge.data.tokenizer import EncoderTokens

TOKENS = EncoderTokens(cls=100, sep=101, mask=102, pad=103, special=(0, 100, 101, 102, 103))
MASKING = Masking(TOKENS, vocab_size=104, rate=0.15)


def _windows(rng: np.random.Generator, shape=(64, 127)) -> np.ndarray:
    w = rng.integers(1, 100, shape)
    w[:, ::20] = 0  # document separators (the end-of-text token), never chosen
    return w


def test_each_sequence_predicts_k_ordinary_positions_and_keeps_their_tokens_as_targets():
    windows = _windows(np.random.default_rng(0))
    x, positions, targets = MASKING.apply(windows, np.random.default_rng(1))
    original = np.concatenate([np.full((64, 1), TOKENS.cls), windows], 1)
    assert x.shape == (64, 128) and positions.shape == targets.shape == (64, 19)  # round(0.15 * 127)
    assert torch.equal(x[:, 0], torch.full((64,), TOKENS.cls))
    for row in range(64):
        assert len(set(positions[row].tolist())) == 19
        assert not np.isin(original[row, positions[row]], TOKENS.special).any()
        assert targets[row].tolist() == original[row, positions[row]].tolist()
        outside = np.setdiff1d(np.arange(128), positions[row])
        assert (x[row, outside].numpy() == original[row, outside]).all()  # only chosen positions change


def test_replacements_are_bert_s_80_10_10():
    windows = _windows(np.random.default_rng(0), (512, 127))
    x, positions, targets = MASKING.apply(windows, np.random.default_rng(2))
    put = x.gather(1, positions)
    n = put.numel()  # 9,728 choices: a share's standard deviation is at most 0.5 / sqrt(n) = 0.005
    masked = (put == TOKENS.mask).float().mean().item()
    kept = (put == targets).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02, (masked, kept, n)  # 4 standard deviations
    assert not torch.isin(put[put != TOKENS.mask], torch.tensor(TOKENS.special)).any()


def test_the_same_seeds_give_the_same_masks_and_other_seeds_other_masks():
    windows = _windows(np.random.default_rng(0))
    a = MASKING.apply(windows, np.random.default_rng([7, 1, 3, 0]))
    b = MASKING.apply(windows, np.random.default_rng([7, 1, 3, 0]))
    c = MASKING.apply(windows, np.random.default_rng([7, 1, 4, 0]))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_a_sequence_short_of_ordinary_tokens_ignores_the_targets_it_cannot_fill():
    windows = np.zeros((1, 19), dtype=np.int64)  # separators only... but for two ordinary tokens
    windows[0, 4], windows[0, 9] = 7, 8
    x, positions, targets = MASKING.apply(windows, np.random.default_rng(0))
    assert positions.shape == (1, 3)
    assert sorted(t for t in targets[0].tolist() if t != -100) == [7, 8]
    assert (targets == -100).sum() == 1
