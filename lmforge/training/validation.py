"""The validation loss that training reports, computed the same way wherever it is asked for.

Training's periodic and final evaluations call :func:`split_loss` (an encoder's:
:func:`masked_lm_metrics`), and so does ``lmforge eval --dataset``, so the two report the same figure
for the same checkpoint and split.
"""

from __future__ import annotations

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


@torch.no_grad()
def masked_lm_metrics(model: torch.nn.Module, batches: EvalBatches, rt: Runtime,
                      par: Parallel | None = None) -> tuple[float, float]:
    """(mean loss per masked token, the share of masked tokens predicted exactly) over an encoder's fixed validation
    batches: its masked-LM figures, computed as :func:`split_loss` deals batches out under torchrun."""
    par = par or Parallel(rt.placement)
    mine = list(range(rt.rank, len(batches), rt.world_size))
    rounds = -(-len(batches) // rt.world_size) if par.sharded else len(mine)
    totals = torch.zeros(3, device=rt.device)  # loss sum, tokens right, tokens predicted
    with eval_mode(model):
        for k in range(rounds):
            x, positions, targets = (to_device(t, rt.device) for t in batches[mine[k] if k < len(mine) else 0])
            with rt.autocast():
                logits, loss = model(x, targets, masked=positions)
            counted = (targets != -100).sum() * (k < len(mine))
            right = ((logits.argmax(-1) == targets) & (targets != -100)).sum() * (k < len(mine))
            totals += torch.stack([loss.float() * counted, right.float(), counted.float()])
    loss_sum, right, counted = par.sum(totals).tolist()
    return loss_sum / counted, right / counted
