"""Token shards on disk -> training batches.

Batches are a pure function of (seed, step, micro-batch): the loader holds no hidden state, so
resuming at step N replays exactly the batches an uninterrupted run would have seen. A step's global
batch is micro-batches j = 0 .. grad_accum x world_size - 1 and rank r takes those with j = r (mod
world_size), so a run keeps its samples on any number of processes (grad_accum x world_size fixed).
Shards are memory-mapped: memory stays constant whatever the corpus size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.testhooks import trace_batch


class TokenShard:
    """One split (train.bin / val.bin) of a prepared dataset, memory-mapped.

    A file of the wrong size (other than ``expected_tokens`` tokens, or not whole tokens) is refused
    when opened; a window holding a token id of ``vocab_size`` or more when it is read (the check
    costs one max over the batch, on the host).
    """

    def __init__(self, dataset_dir: str | Path, split: str, dtype: str, block_size: int,
                 vocab_size: int | None = None, expected_tokens: int | None = None):
        path = Path(dataset_dir) / f"{split}.bin"
        if not path.is_file():
            raise UserError(f"dataset file '{path}' is missing (run `lmforge prepare` first)")
        self.path, self.vocab_size = path, vocab_size
        size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
        n_tokens = size // itemsize
        if size % itemsize or (expected_tokens is not None and n_tokens != expected_tokens):
            raise UserError(f"'{path}' has {size:,} bytes, expected {expected_tokens or 'a whole number of'} {dtype} "
                            f"tokens as meta.json records: the file is damaged (prepare the dataset again)")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.block_size = block_size
        if len(self.tokens) < block_size + 2:
            raise UserError(f"'{path}' has {len(self.tokens)} tokens, fewer than one block of "
                            f"{block_size} + 1; use more text or a smaller model.block_size")

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for windows starting at the given offsets."""
        idx = offsets[:, None] + np.arange(self.block_size + 1)
        window = self.tokens[idx]
        if self.vocab_size is not None and window.max() >= self.vocab_size:
            bad = int(idx.flat[np.argmax(window >= self.vocab_size)])
            raise UserError(f"'{self.path}' holds token id {int(self.tokens[bad])} at token {bad:,}, outside the "
                            f"model's vocabulary of {self.vocab_size}: the file is damaged or from another "
                            f"tokenizer (prepare the dataset again)")
        chunk = torch.from_numpy(window.astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def open_split(meta: dict, split: str, block_size: int, vocab_size: int) -> TokenShard:
    """A split of a prepared dataset (``meta`` as :func:`lmforge.data.prepare.load_meta` returns it),
    checked against the token count meta.json records and the model's vocabulary."""
    return TokenShard(meta["dir"], split, meta["dtype"], block_size, vocab_size, meta["splits"][split]["tokens"])


class BatchSampler:
    """Random windows from a shard: this rank's micro-batch ``micro`` of a step is the step's global
    micro-batch j = micro x world_size + rank, determined by (seed, step, j)."""

    def __init__(self, shard: TokenShard, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def offsets(self, step: int, micro: int = 0) -> np.ndarray:
        """The window starts (sample ids) of this rank's micro-batch ``micro`` of ``step``."""
        j = micro * self.world_size + self.rank
        # (The 0 keeps the stream of runs made before the global numbering: they resume unchanged.)
        rng = np.random.default_rng([self.seed, 0, step, j])
        high = len(self.shard) - self.shard.block_size - 1
        offsets = rng.integers(0, high, size=self.batch_size)
        trace_batch(step, j, offsets)
        return offsets

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shard.windows(self.offsets(step, micro))


def prefetch_batches(sampler: BatchSampler, start_step: int, grad_accum: int, device: torch.device,
                     depth: int = 2) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches for (step, micro) from start_step on, already on ``device``, in order.

    On CUDA a background thread gathers the next ``depth`` batches from the memory map into pinned
    memory and starts their non-blocking copies while the GPU computes; on the CPU the gather is
    cheap next to the step and a thread would only take a core from the compute, so it runs inline.
    """
    def produce(step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            for micro in range(grad_accum):
                yield tuple(to_device(t, device) for t in sampler.batch(step, micro))
            step += 1

    if device.type != "cuda":
        yield from produce(start_step)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in produce(start_step):
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            put(e)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def eval_offsets(n_tokens: int, block_size: int, n_batches: int, batch_size: int) -> np.ndarray:
    """Evenly spaced window starts covering the split (the same every evaluation, so comparable)."""
    n = min(n_batches * batch_size, max(1, (n_tokens - 1) // block_size))
    high = n_tokens - block_size - 1
    return np.linspace(0, high, num=n).astype(np.int64) if n > 1 else np.zeros(1, dtype=np.int64)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device; on CUDA through pinned memory so the copy overlaps compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class EpochSampler:
    """Batches of item indices: epochs of seeded permutations, batch k a pure function of (seed, k).

    For a finite set of examples (fine-tuning): every item once per epoch, in a new order each
    epoch; like :class:`BatchSampler`, resuming at a step replays exactly the same batches.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = -1, np.arange(0)  # the permutation of the epoch last asked for

    def indices(self, step: int, micro: int, grad_accum: int) -> list[int]:
        first = ((step * grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        out = []
        for k in range(first, first + self.batch_size):
            epoch, i = divmod(k, self.n)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm
