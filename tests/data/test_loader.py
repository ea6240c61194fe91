import numpy as np
import pytest
import torch

from lmforge.data.loader import BatchSampler, TokenShard, eval_offsets, prefetch_batches
from lmforge.errors import UserError


@pytest.fixture
def shard(tmp_path) -> TokenShard:
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    return TokenShard(tmp_path, "train", "uint16", block_size=16)


def test_targets_are_inputs_shifted_by_one(shard):
    x, y = BatchSampler(shard, 4, seed=1).batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))


def test_batches_are_a_function_of_seed_rank_step_micro(shard):
    a = BatchSampler(shard, 4, seed=1)
    assert torch.equal(a.batch(5, 1)[0], BatchSampler(shard, 4, seed=1).batch(5, 1)[0])
    assert not torch.equal(a.batch(5, 1)[0], a.batch(5, 0)[0])
    assert not torch.equal(a.batch(5, 1)[0], a.batch(6, 1)[0])
    assert not torch.equal(a.batch(5, 1)[0], BatchSampler(shard, 4, seed=1, rank=1).batch(5, 1)[0])


def test_eval_offsets_cover_the_split_without_overlap():
    offs = eval_offsets(1000, 16, n_batches=10**9, batch_size=4)
    assert len(offs) == 62 and offs[0] == 0 and offs[-1] == 1000 - 17
    assert np.all(np.diff(offs) >= 16)
    assert len(eval_offsets(1000, 16, n_batches=2, batch_size=4)) == 8


def test_too_short_split_and_missing_file_are_user_errors(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(UserError, match="fewer than one block"):
        TokenShard(tmp_path, "val", "uint16", block_size=16)
    with pytest.raises(UserError, match="missing"):
        TokenShard(tmp_path, "train", "uint16", block_size=16)


def test_prefetched_batches_follow_step_and_micro_order(shard):
    sampler = BatchSampler(shard, batch_size=3, seed=7)
    stream = prefetch_batches(sampler, start_step=5, grad_accum=2, device=torch.device("cpu"))
    for step in (5, 6):
        for micro in (0, 1):
            x, y = next(stream)
            ex, ey = sampler.batch(step, micro)
            assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetched_batches_on_cuda_match_the_sampler(shard):
    sampler = BatchSampler(shard, batch_size=3, seed=7)
    stream = prefetch_batches(sampler, start_step=0, grad_accum=1, device=torch.device("cuda"))
    for step in range(4):
        x, _ = next(stream)
        assert x.is_cuda and torch.equal(x.cpu(), sampler.batch(step)[0])


def test_a_damaged_shard_is_refused_when_opened_and_a_foreign_token_when_read(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\0")  # half a token
    with pytest.raises(UserError, match="'.*train.bin' has 2,001 bytes, expected a whole number of uint16 tokens"):
        TokenShard(tmp_path, "train", "uint16", block_size=16)
    tokens[:998].tofile(tmp_path / "train.bin")  # cut at a token boundary: only meta.json's count tells
    with pytest.raises(UserError, match="has 1,996 bytes, expected 1000 uint16 tokens"):
        TokenShard(tmp_path, "train", "uint16", block_size=16, expected_tokens=1000)
    shard = TokenShard(tmp_path, "train", "uint16", block_size=16, vocab_size=500)
    assert shard.windows(np.array([0, 400]))[0].shape == (2, 16)
    with pytest.raises(UserError, match="token id 500 at token 500, outside the model's vocabulary of 500"):
        shard.windows(np.array([0, 500]))


def test_an_error_in_the_background_loader_reaches_the_training_loop(shard):
    class Broken(BatchSampler):
        def batch(self, step, micro=0):
            raise UserError("the shard broke")

    # The CUDA path gathers in a thread; here it fails before any copy to the (absent) GPU.
    stream = prefetch_batches(Broken(shard, 4, seed=1), 0, 1, torch.device("cuda"))
    with pytest.raises(UserError, match="the shard broke"):
        next(stream)
