"""The optimizers (AdamW; Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedules (warmup, then cosine decay or warmup-stable-decay)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.optim._muon import _adjust_lr

from lmforge.config import OptimConfig
from lmforge.errors import UserError
from lmforge.model.gpt import Block


def lr_at(step: int, cfg: OptimConfig, max_steps: int, warmup_steps: int | None = None) -> float:
    """The learning rate of ``step``: linear warmup from 0 to cfg.lr over ``warmup_steps`` (default
    cfg.warmup_steps; a time budget may plan fewer), then the decay to min_lr by decay_steps (default
    max_steps), then flat.

    'cosine' decays along a half cosine from the end of the warmup; 'wsd' holds lr until the last
    decay_fraction of the steps after the warmup, then decays linearly.
    """
    decay_steps = cfg.decay_steps or max_steps
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return cfg.min_lr
    span = max(1, decay_steps - warmup)
    progress = (step - warmup) / span
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        if progress < decay_start:
            return cfg.lr
        return cfg.lr + (progress - decay_start) / cfg.decay_fraction * (cfg.min_lr - cfg.lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every parameter group to the schedule's ``lr``, times the group's ``lr_scale`` (Muon's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay biases and norm gains (1-D)."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def orthogonalize(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: ~U V^T of g = U S V^T, computed in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: the Gram matrix x x^T is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iteration in a chosen dtype, and on FSDP2's sharded matrices.

    PyTorch's runs it in bf16, which is right on GPUs and CPUs with bf16 units, and ~100x slower than
    fp32 on CPUs without them (a bf16 GEMM at ~1 GFLOP/s): the training precision decides instead.
    The update is PyTorch's otherwise (Nesterov momentum, decoupled weight decay, its lr adjustment).

    Under FSDP2 each process holds a slice of every matrix's rows (DTensors), but the iteration needs whole
    matrices. As the published distributed Muon implementations do, each matrix gets an owner, round-robin over
    the processes: the momentum update's slices go to the owner (one all-to-all for every ``world_size``
    matrices), the owner orthogonalizes the whole matrix, and the slices of the result go back (a second
    all-to-all). Every process thus orthogonalizes ~1/world_size of the matrices, holds whole matrices only
    transiently, and keeps its momentum sharded; the update is the one process's, up to the order in which the
    gradients were summed.
    """

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = float(group["lr"]), group["momentum"]

            def ortho(update: torch.Tensor, group: dict = group) -> torch.Tensor:
                return orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                     self.ns_dtype)

            updates = []
            for grad, buf in zip(grads, bufs, strict=True):
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            sharded = [_is_sharded(u) for u in updates]
            if any(sharded) and not all(sharded):
                raise ValueError("Muon: either every matrix of a group is sharded (FSDP2) or none is")
            orthogonal = orthogonalize_sharded(updates, ortho) if all(sharded) and updates else map(ortho, updates)
            for p, update in zip(params, orthogonal, strict=True):
                local = p.to_local() if _is_sharded(p) else p  # the same storage: in place is in place
                local.mul_(1 - lr * group["weight_decay"])
                local.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2's parameters, their gradients and the state made like them)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported (it is slow to): there are none
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _shard_rows(rows: int, world: int) -> list[int]:
    """How many of a matrix's ``rows`` each rank holds under FSDP2's Shard(0) (``torch.chunk``'s split: ranks of
    ceil(rows / world) rows, the last ones fewer or none)."""
    size = -(-rows // world)
    return [max(0, min(rows, (r + 1) * size) - r * size) for r in range(world)]


def orthogonalize_sharded(updates: list[torch.Tensor],
                          ortho: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``ortho`` of each whole matrix whose row slices ``updates`` are (DTensors sharded on dim 0 over one process
    group), as this rank's slice of each result (plain tensors).

    Matrix ``i`` is orthogonalized by rank ``i % world_size``; the slices travel in two all-to-alls per
    ``world_size`` matrices (``all_to_all_single`` with split sizes: gloo and NCCL both have it).
    """
    import torch.distributed as dist
    from torch.distributed.tensor.placement_types import Shard

    mesh = updates[0].device_mesh
    if mesh.ndim != 1 or any(u.placements != (Shard(0),) for u in updates):
        raise ValueError("Muon under FSDP: expected matrices sharded by rows over one mesh dimension")
    pg = mesh.get_group()
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    results: list[torch.Tensor] = []
    for start in range(0, len(updates), world):
        chunk = updates[start:start + world]  # chunk[j] is owned by rank j
        rows = [_shard_rows(u.shape[0], world) for u in chunk]
        cols = [u.shape[1] for u in chunk]
        dtype = chunk[0].dtype
        pieces = [u.to_local().to(dtype).reshape(-1) for u in chunk]
        # 1. To the owners: rank j receives every rank's slice of chunk[j], in rank order (= the rows' order).
        send = [rows[j][rank] * cols[j] for j in range(len(chunk))] + [0] * (world - len(chunk))
        mine = rank < len(chunk)
        recv = [rows[rank][i] * cols[rank] for i in range(world)] if mine else [0] * world
        whole = pieces[0].new_empty(sum(recv))
        dist.all_to_all_single(whole, torch.cat(pieces), recv, send, group=pg)
        # 2. The owner orthogonalizes its whole matrix; 3. each rank gets its slice of every result back.
        done = ortho(whole.view(chunk[rank].shape)).to(dtype).reshape(-1) if mine else whole
        back = pieces[0].new_empty(sum(send))
        dist.all_to_all_single(back, done.contiguous(), send, recv, group=pg)
        results += [piece.view(rows[j][rank], cols[j]) for j, piece in enumerate(back.split(send[:len(chunk)]))]
    return results


class MuonAdamW:
    """Muon for the 2-D weights inside the Transformer blocks, AdamW for everything else (embeddings, the
    output head, gains, biases), stepped together.

    It is one optimizer to the training loop and the checkpoints: ``param_groups`` lists both parts'
    groups, and ``state_dict`` numbers the parameters through both, in the layout of one
    ``torch.optim`` optimizer's state dict.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts for p, s in part.state.items()}

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            sd = part.state_dict()
            state.update({pid + offset: s for pid, s in sd["state"].items()})
            groups += [{**g, "params": [pid + offset for pid in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        offset = 0
        for part in self.parts:
            mine, groups = groups[: len(part.param_groups)], groups[len(part.param_groups):]
            n = sum(len(g["params"]) for g in mine)
            part.load_state_dict({
                "state": {pid - offset: s for pid, s in sd["state"].items() if offset <= pid < offset + n},
                "param_groups": [{**g, "params": [pid - offset for pid in g["params"]]} for g in mine]})
            offset += n


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    precision: str = "fp32") -> torch.optim.Optimizer | MuonAdamW:
    """AdamW (fused: one kernel for all parameters, on devices that support it), or :class:`MuonAdamW`
    (whose Newton-Schulz iteration runs in bf16 when the training ``precision`` is bf16, else in fp32)."""
    fused = device.type in ("cuda", "cpu", "mps")
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps,
                                 fused=fused)
    # Every Transformer block's matrices, wherever the blocks sit: a decoder's or encoder's ``blocks``, an
    # encoder-decoder's ``encoder_blocks`` and ``decoder_blocks`` (cross-attention's q, kv and proj too).
    hidden = {id(p) for block in model.modules() if isinstance(block, Block)
              for p in block.parameters() if p.dim() == 2 and p.requires_grad}
    if not hidden:
        raise UserError("optim.name=muon: this model has no trainable Transformer block matrices for Muon "
                        "(use optim.name=adamw)")
    muon_params = [p for p in model.parameters() if id(p) in hidden]
    rest = [group for group in ({**g, "params": [p for p in g["params"] if id(p) not in hidden]}
                                for g in param_groups(model, cfg.weight_decay)) if group["params"]]
    scale = cfg.muon_lr / cfg.lr
    # Muon's decay is lr * weight_decay per step like AdamW's: the same relative decay at Muon's larger lr.
    ns_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    muon = Muon([{"params": muon_params, "lr_scale": scale}], ns_dtype=ns_dtype, lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay / scale, momentum=cfg.muon_momentum)
    adamw = torch.optim.AdamW(rest, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)
    return MuonAdamW(muon, adamw)
