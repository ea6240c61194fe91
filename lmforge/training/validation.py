"""The validation loss that training reports, computed the same way wherever it is asked for.

Training's periodic and final evaluations call :func:`split_loss` (an encoder's:
:func:`masked_lm_metrics`; an encoder-decoder's: :func:`denoising_metrics`), and so does
``lmforge eval --dataset``, so the two report the same figure for the same checkpoint and split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.data.loader import TokenShard, eval_offsets, to_device
from lmforge.data.masking import EvalBatches
from lmforge.runtime import Runtime, eval_mode
from lmforge.training.parallel import Parallel


@torch.no_grad()
def split_loss(model: torch.nn.Module, shard: TokenShard, rt: Runtime, batch_size: int, n_batches: int,
               par: Parallel | None = None) -> float:
    """Mean next-token loss over fixed, evenly spaced windows of a split (all of it for a huge n_batches).

    Under torchrun the batches are dealt out to the ranks and the sums added up (the same windows as one
    process, summed in another order). Under FSDP every forward is a collective, so a rank with one batch
    fewer runs one more forward that counts for nothing.
    """
    par = par or Parallel(rt.placement)
    offsets = eval_offsets(len(shard), shard.block_size, n_batches, batch_size)
    batches = [offsets[i:i + batch_size] for i in range(0, len(offsets), batch_size)]
    mine = batches[rt.rank::rt.world_size]
    rounds = -(-len(batches) // rt.world_size) if par.sharded else len(mine)
    total = torch.zeros((), device=rt.device)
    with eval_mode(model):
        for k in range(rounds):
            x, y = shard.windows(mine[k] if k < len(mine) else batches[0])
            with rt.autocast():
                _, loss = model(to_device(x, rt.device), to_device(y, rt.device))
            total += loss.float() * (len(x) if k < len(mine) else 0)
    return par.sum(total).item() / len(offsets)


def masked_lm_metrics(model: torch.nn.Module, batches: EvalBatches, rt: Runtime,
                      par: Parallel | None = None) -> tuple[float, float]:
    """(mean loss per masked token, the share of masked tokens predicted exactly) over an encoder's fixed validation
    batches: its masked-LM figures, computed as :func:`split_loss` deals batches out under torchrun."""
    def forward(x, positions, targets):
        return (*model(x, targets, masked=positions), targets)

    return _token_metrics(model, batches, forward, rt, par)


def denoising_metrics(model: torch.nn.Module, batches: EvalBatches, rt: Runtime,
                      par: Parallel | None = None) -> tuple[float, float]:
    """(mean loss per target token, the share of target tokens predicted exactly with the true ones before them)
    over an encoder-decoder's fixed validation batches (:class:`lmforge.data.denoising.Infilling`): how well it
    writes back the windows it reads corrupted."""
    def forward(src, src_mask, tgt, labels):
        return (*model(src, tgt, labels, src_mask=src_mask), labels)

    return _token_metrics(model, batches, forward, rt, par)


@torch.no_grad()
def _token_metrics(model: torch.nn.Module, batches: EvalBatches,
                   forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rt: Runtime,
                   par: Parallel | None) -> tuple[float, float]:
    """(mean loss per predicted token, the share predicted exactly) over fixed batches, ``forward(*batch)`` giving
    (logits, mean loss, targets with -100 where nothing is predicted); dealt out as :func:`split_loss` does."""
    par = par or Parallel(rt.placement)
    mine = list(range(rt.rank, len(batches), rt.world_size))
    rounds = -(-len(batches) // rt.world_size) if par.sharded else len(mine)
    totals = torch.zeros(3, device=rt.device)  # loss sum, tokens right, tokens predicted
    with eval_mode(model):
        for k in range(rounds):
            batch = (to_device(t, rt.device) for t in batches[mine[k] if k < len(mine) else 0])
            with rt.autocast():
                logits, loss, targets = forward(*batch)
            counted = (targets != -100).sum() * (k < len(mine))
            right = ((logits.argmax(-1) == targets) & (targets != -100)).sum() * (k < len(mine))
            totals += torch.stack([loss.float() * counted, right.float(), counted.float()])
    loss_sum, right, counted = par.sum(totals).tolist()
    return loss_sum / counted, right / counted
