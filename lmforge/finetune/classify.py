"""Sequence classification: a linear head on the hidden state of each text's last token.

The backbone is causal, so the last real token is the only one that has read the whole text, and
right padding after it changes nothing. Labels are strings; their sorted list (saved with the run
as ``labels.json``) fixes the class ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.gpt import GPT

LABELS_FILE = "labels.json"


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


def encode_texts(texts: list[str], tokenizer: Tokenizer, max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, cut to ``max_len`` (the number cut is returned); empty texts get EOT."""
    out, truncated = [], 0
    for ids in tokenizer.encode_batch(texts):
        ids = ids or [tokenizer.eot_id]
        truncated += len(ids) > max_len
        out.append(ids[:max_len])
    return out, truncated


def text_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-padded ids, lengths)."""
    T = max(len(x) for x in ids)
    return (torch.tensor([x + [pad_id] * (T - len(x)) for x in ids]), torch.tensor([len(x) for x in ids]))


def class_weight_tensor(spec: str | list[float] | None, labels: list[int], n_classes: int) -> torch.Tensor | None:
    """Loss weights per class: None (equal), 'balanced' (n / (C * count)), or one number per class."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if isinstance(spec, str):
        raise UserError(f"class_weights: expected 'balanced' or a list of numbers, got {spec!r}")
    if len(spec) != n_classes:
        raise UserError(f"class_weights has {len(spec)} numbers but there are {n_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...],
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    x, lengths, y = batch
    logits = model(x, lengths).float()
    return F.cross_entropy(logits, y, weight=None if weight is None else weight.to(logits.device))


def classification_metrics(y_true: list[int], y_pred: list[int], n_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 (scikit-learn) and the confusion matrix (rows: true)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(n_classes))
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_precision": float(p),
            "macro_recall": float(r), "macro_f1": float(f1),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist()}


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    width = max(6, *(len(s) for s in labels))
    header = " ".join(f"{s[:width]:>{width}}" for s in labels)
    lines = [" " * width + " " + header + "   (rows: true, columns: predicted)"]
    for name, row in zip(labels, matrix, strict=True):
        lines.append(f"{name[:width]:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


@torch.no_grad()
def predict(model: SequenceClassifier, ids: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, C) for tokenized texts."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        x, lengths = text_batch(ids[i:i + batch_size], pad_id)
        out.append(torch.softmax(model(x.to(device), lengths.to(device)).float(), dim=-1).cpu())
    return torch.cat(out)


def save_labels(run_dir: Path, labels: list[str]) -> None:
    (Path(run_dir) / LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")


def load_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {LABELS_FILE}: it is not a classification run")
    return json.loads(path.read_text(encoding="utf-8"))
