"""Sequence classification: a linear head on the hidden state of each text's last token.

The backbone is causal, so the last real token is the only one that has read the whole text, and
right padding after it changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.gpt import GPT


class SequenceClassifier(nn.Module):
    """A GPT backbone and a bias-free linear ``score`` head over its final hidden states."""

    def __init__(self, backbone: GPT, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.n_embd, n_classes, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) for right-padded token ids (B, T) with ``lengths`` real tokens each."""
        h = self.backbone.hidden_states(idx)
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.score(last)


def text_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-padded ids, lengths): what :meth:`SequenceClassifier.forward` takes."""
    T = max(len(x) for x in ids)
    return (torch.tensor([x + [pad_id] * (T - len(x)) for x in ids]), torch.tensor([len(x) for x in ids]))


@torch.no_grad()
def class_probabilities(model: SequenceClassifier, ids: list[list[int]], pad_id: int,
                        batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, C) for tokenized texts."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        x, lengths = text_batch(ids[i:i + batch_size], pad_id)
        out.append(torch.softmax(model(x.to(device), lengths.to(device)).float(), dim=-1).cpu())
    return torch.cat(out)
