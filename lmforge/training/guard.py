"""The NaN/Inf guard: a step whose loss or gradient norm is not finite never changes the weights or
the optimizer state, and the host learns of it without a device sync per step.

Deciding on the host would wait for the device every step. Instead each step hands the optimizer a
``found_inf`` flag computed on the device, the flag ``torch.amp.GradScaler`` uses: fused AdamW reads
it inside its kernel and leaves parameters, moments and step counts exactly as they were. The step's
loss and norm go into a small device buffer that the host reads only where the training loop syncs
anyway (logging, evaluation, checkpoints) and then applies the policy: report the skipped steps, or
halt naming the first bad one. No checkpoint is written before that read, so a halted run's last
checkpoint holds the last good weights. An optimizer without ``found_inf`` support (not fused) gets
the same decisions from a host check each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lmforge.errors import TrainingHalted


@dataclass
class SkippedStep:
    step: int
    reason: str
    """``the loss is nan``, ``the gradient norm is inf``, ..."""
    in_a_row: int


class NonfiniteGuard:
    """Keeps non-finite steps from the optimizer; :meth:`settle` applies ``on_nonfinite`` to them."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_nonfinite: Literal["halt", "skip"],
                 max_in_a_row: int, device: torch.device, in_a_row: int = 0):
        self.optimizer = optimizer
        self.on_nonfinite = on_nonfinite
        self.max_in_a_row = max_in_a_row
        # GradScaler's contract: an optimizer that sets this reads found_inf (and grad_scale) in step().
        self.on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._rows = torch.zeros((64, 2), device=device)  # (loss, gradient norm) per step since settle()
        self._count = 0
        self._first_step = 0
        self.in_a_row = in_a_row
        """Non-finite steps in a row, up to the last :meth:`settle` (a resumed run starts from its checkpoint's)."""

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Run the optimizer step for training step ``step`` unless its loss or gradient norm is not
        finite; returns that verdict (a 0-dim bool tensor on the device, True = skipped)."""
        row = torch.stack((loss.detach().float(), grad_norm.detach().float()))
        bad = ~torch.isfinite(row).all()
        if self._count == len(self._rows):  # more steps between two settles than expected: grow
            self._rows = torch.cat((self._rows, torch.zeros_like(self._rows)))
        if self._count == 0:
            self._first_step = step
        self._rows[self._count] = row
        self._count += 1
        if self.on_device:
            self.optimizer.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bad:  # one host sync per step: only for optimizers that cannot read found_inf
            self.optimizer.step()
        return bad

    def settle(self) -> list[SkippedStep]:
        """The steps skipped since the last call (one device sync), or :class:`TrainingHalted` at the
        first non-finite step under ``halt``, or the one that makes too many in a row under ``skip``."""
        if self._count == 0:
            return []
        rows = self._rows[: self._count].tolist()
        self._count = 0
        skipped = []
        for i, (loss, norm) in enumerate(rows):
            # The same float32 values the device tested, so the same verdict.
            if math.isfinite(loss) and math.isfinite(norm):
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            step = self._first_step + i
            reason = f"the loss is {loss:.4g}" if not math.isfinite(loss) else f"the gradient norm is {norm:.4g}"
            if self.on_nonfinite == "halt" or self.in_a_row > self.max_in_a_row:
                raise TrainingHalted(f"step {step}: {reason} ({self.in_a_row} in a row); stopped before its "
                                     f"optimizer step, so no checkpoint holds non-finite weights (try a lower "
                                     f"optim.lr, or optim.grad_clip)")
            skipped.append(SkippedStep(step, reason, self.in_a_row))
        return skipped
