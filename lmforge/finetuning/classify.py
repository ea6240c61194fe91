"""Fine-tuning for sequence classification: labelled texts (CSV or JSONL) -> a
:class:`~lmforge.model.classifier.SequenceClassifier` on the base model.

Labels are strings; their sorted list (saved with the run as ``labels.json``) fixes the class ids.
The loss may weigh classes (``class_weights``); each evaluation reports val loss, accuracy and macro
precision/recall/F1, and the final one the confusion matrix as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import rundir
from lmforge.config import FinetuneConfig, FinetuneDataConfig
from lmforge.data.records import ReadReport, read_train_val, require
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.tasks import classification_metrics, format_confusion
from lmforge.model.classifier import SequenceClassifier, text_batch
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime, eval_mode


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


def label_names(train: list[str], val: list[tuple[list[str], str]], source: str, field: str, kind: str) -> list[str]:
    """The sorted distinct names in ``train`` (labels, or tags), which fix the class ids; UserError if there are fewer
    than 2, or if a val record (its names, where it is) holds one that training never saw."""
    names = sorted(set(train))
    if len(names) < 2:
        raise UserError(f"'{source}' has {len(names)} distinct {kind}(s) in field '{field}': classification needs at "
                        f"least 2")
    known = set(names)
    for values, where in val:
        unknown = next((v for v in values if v not in known), None)
        if unknown is not None:
            raise UserError(f"{where}: {kind} {unknown!r} never occurs in the training examples "
                            f"(known: {', '.join(names)})")
    return names


def _labelled_text(d: FinetuneDataConfig):
    def convert(r: dict) -> tuple[str, str]:
        label = require(r, d.label_field, (str, int, bool))
        return require(r, d.text_field), str(label)

    return convert


class ClassifyTask:
    """A classification fine-tuning task: its model (base + new head), batches, loss and evaluation."""

    trainable_modules = ["score"]
    """Trained in full even under LoRA: the new head."""
    compare_with_base = False
    """The base model has no head to evaluate before fine-tuning."""

    def __init__(self, cfg: FinetuneConfig, backbone: GPT | Encoder, tokenizer: Tokenizer, max_len: int, rt: Runtime):
        d = cfg.data
        framed = backbone.cfg.arch == "encoder"  # an encoder reads [CLS] text [SEP] (padded with [PAD])
        self.rt, self.batch_size, self.pad = rt, cfg.train.batch_size, tokenizer.pad_id(framed)
        report = ReadReport()
        train_rec, val_rec = read_train_val(d.train, d.val, d.val_fraction, d.seed, _labelled_text(d),
                                            d.skip_bad_lines, report)
        labels = label_names([label for (_, label), _ in train_rec],
                             [([label], where) for (_, label), where in val_rec], d.train, d.label_field, "label")
        index = {label: i for i, label in enumerate(labels)}
        self.labels = labels
        self.train_ids, t1 = tokenizer.encode_texts([t for (t, _), _ in train_rec], max_len, framed)
        self.val_ids, t2 = tokenizer.encode_texts([t for (t, _), _ in val_rec], max_len, framed)
        self.y_train = [index[label] for (_, label), _ in train_rec]
        self.y_val = [index[label] for (_, label), _ in val_rec]
        self.weight = class_weight_tensor(cfg.class_weights, self.y_train, len(labels))
        self.model = SequenceClassifier(backbone, len(labels))
        self.n_train = len(self.train_ids)
        majority = max(self.y_val.count(c) for c in range(len(labels))) / len(self.y_val)
        self.summary = [f"classify: {len(self.train_ids)} train / {len(self.val_ids)} val texts, {len(labels)} "
                        f"classes ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})",
                        f"{t1 + t2} texts truncated to {max_len} tokens | majority-class val accuracy {majority:.1%}",
                        *report.summary()]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Training items -> (ids, lengths, labels) on the CPU."""
        x, lengths = text_batch([self.train_ids[i] for i in indices], self.pad)
        return x, lengths, torch.tensor([self.y_train[i] for i in indices])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return classification_loss(model, batch, self.weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool) -> dict:
        """Val loss, accuracy, macro P/R/F1; the final evaluation adds the confusion matrix."""
        losses, preds = [], []
        device, bs = self.rt.device, self.batch_size
        with eval_mode(model):
            for i in range(0, len(self.val_ids), bs):
                x, lengths = text_batch(self.val_ids[i:i + bs], self.pad)
                y = torch.tensor(self.y_val[i:i + bs])
                with self.rt.autocast():
                    logits = model(x.to(device), lengths.to(device)).float().cpu()
                losses.append(F.cross_entropy(logits, y, reduction="sum").item())
                preds += logits.argmax(-1).tolist()
        metrics = classification_metrics(self.y_val, preds, len(self.labels))
        if not final:
            metrics.pop("confusion_matrix")
        return {"val_loss": sum(losses) / len(self.y_val),
                **{f"val_{k}" if k != "confusion_matrix" else k: v for k, v in metrics.items()}}

    def save_files(self, run_dir: Path) -> None:
        rundir.save_labels(run_dir, self.labels)

    def final_lines(self, metrics: dict) -> list[str]:
        """What the end of the run prints beyond the scalar metrics: the confusion matrix."""
        return [format_confusion(metrics["confusion_matrix"], self.labels)] if "confusion_matrix" in metrics else []
