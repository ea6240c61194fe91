"""A pruned model's sparsity pattern, held fixed while it trains (``lmforge prune --recover-steps``).

The pattern is a boolean mask per pruned weight, kept in the run directory (:data:`MASK_FILE`, named in
``run.json``): training multiplies each weight by its mask after every optimizer step, so pruned weights stay
exactly zero whatever the optimizer's momentum or weight decay would do, and a resumed run reads the same mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError

MASK_FILE = "sparsity_mask.safetensors"


def save_masks(folder: Path, masks: dict[str, torch.Tensor]) -> Path:
    """Write ``masks`` (parameter name -> boolean tensor of its shape, True = kept) into ``folder``."""
    path = Path(folder) / MASK_FILE
    save_file({name: m.to(torch.bool).contiguous().cpu() for name, m in masks.items()}, str(path))
    return path


class MaskHolder:
    """Re-applies masks to a model's parameters (after each optimizer step)."""

    def __init__(self, model: torch.nn.Module, path: Path):
        params = dict(model.named_parameters())
        try:
            masks = load_file(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the sparsity mask '{path}' ({e})") from None
        unknown = sorted(set(masks) - set(params))
        if unknown or any(params[n].shape != m.shape for n, m in masks.items() if n in params):
            raise UserError(f"the sparsity mask '{path}' does not fit this model "
                            f"({'unknown weight ' + unknown[0] if unknown else 'a shape differs'})")
        self.pairs = [(params[n], m.to(params[n].device, params[n].dtype)) for n, m in masks.items()]

    @torch.no_grad()
    def __call__(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)

    def sparsity(self) -> float:
        """The fraction of the masked weights that are zero."""
        total = sum(m.numel() for _, m in self.pairs)
        return sum(int((p == 0).sum()) for p, _ in self.pairs) / max(total, 1)
