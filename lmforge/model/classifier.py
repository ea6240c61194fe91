"""Sequence classification: a linear head on one vector per text, which the backbone chooses
(``sequence_representation``): a decoder's last real token, the only one that has read the whole
text; an encoder's first token ([CLS]), through its pooler where it has one (BERT).

Token classification (tagging): a linear head on every token's vector (``token_representations``): on an encoder
each has read the whole text, on a decoder only the tokens up to itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT


class _TaskHead(nn.Module):
    """A backbone (:class:`GPT` or :class:`Encoder`) and a new linear ``score`` layer over what it reads of it (with a
    bias on an encoder, as BERT's classifiers have; without on a decoder, as transformers' GPT-2 one)."""

    def __init__(self, backbone: GPT | Encoder, n_out: int):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.n_embd, n_out, bias=backbone.classifier_bias)
        nn.init.normal_(self.score.weight, std=0.02)
        if self.score.bias is not None:
            nn.init.zeros_(self.score.bias)


class SequenceClassifier(_TaskHead):
    """A class per text: ``score`` over the backbone's sequence representation."""

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) for right-padded token ids (B, T) with ``lengths`` real tokens each."""
        return self.score(self.backbone.sequence_representation(idx, lengths))


class TokenClassifier(_TaskHead):
    """A tag per token: ``score`` over each token's representation."""

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, T, n_tags) for right-padded token ids (B, T) with ``lengths`` real tokens each (the logits
        at padding positions mean nothing)."""
        return self.score(self.backbone.token_representations(idx, lengths))


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


@torch.no_grad()
def word_logits(model: nn.Module, ids: list[list[int]], positions: list[list[int]], pad_id: int, batch_size: int = 32,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> list[torch.Tensor]:
    """Tag logits of a :class:`TokenClassifier` (float32, on the CPU) at ``positions[i]`` of each tokenized text
    ``ids[i]``: one (len(positions[i]), n_tags) tensor per text. Fine-tuning's evaluation and ``lmforge predict``
    both read a word's tag here, at its first sub-token."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        x, lengths = text_batch(ids[i:i + batch_size], pad_id)
        with autocast():
            logits = model(x.to(device), lengths.to(device)).float().cpu()
        out += [logits[j, positions[i + j]] for j in range(len(x))]
    return out
