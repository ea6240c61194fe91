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
