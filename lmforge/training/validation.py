"""The validation loss that training reports, computed the same way wherever it is asked for.

Training's periodic and final evaluations call :func:`split_loss`, and so does ``lmforge eval
--dataset``, so the two report the same figure for the same checkpoint and split.
"""

from __future__ import annotations

import torch

from lmforge.data.loader import TokenShard, eval_offsets, to_device
from lmforge.runtime import Runtime, eval_mode


@torch.no_grad()
def split_loss(model: torch.nn.Module, shard: TokenShard, rt: Runtime, batch_size: int, n_batches: int) -> float:
    """Mean next-token loss over fixed, evenly spaced windows of a split (all of it for a huge n_batches)."""
    offsets = eval_offsets(len(shard), shard.block_size, n_batches, batch_size)
    total = torch.zeros((), device=rt.device)
    with eval_mode(model):
        for i in range(0, len(offsets), batch_size):
            x, y = shard.windows(offsets[i:i + batch_size])
            with rt.autocast():
                _, loss = model(to_device(x, rt.device), to_device(y, rt.device))
            total += loss.float() * len(x)
    return total.item() / len(offsets)
