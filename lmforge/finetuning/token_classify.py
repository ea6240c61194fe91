"""Fine-tuning for token classification (tagging: named entities, parts of speech): JSONL records of words and
one tag per word -> a :class:`~lmforge.model.classifier.TokenClassifier` on the base model.

Each record's words are tokenized one by one (the tokenizers library's pretokenized mode, which says which word
each token comes from); a word's tag is learnt and predicted at its FIRST sub-token and the others are ignored
(``IGNORE``), transformers' token-classification recipe: every word counts once, however many pieces it has. On
an encoder the text is framed ``[CLS] ... [SEP]`` and every position has read the whole text; on a decoder it is
not framed and a word's first sub-token has read only the words before it (and that piece).

Tags are strings; their sorted list (saved with the run as ``labels.json``) fixes the tag ids. Each evaluation
reports val loss and word-level accuracy and macro precision/recall/F1 over tags; the final one adds the
confusion matrix. A text cut to the context loses its last words: they are neither learnt nor scored.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import rundir
from lmforge.config import FinetuneConfig
from lmforge.data.records import ReadReport, read_train_val
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.words import EncodedWords, encode_words, tagged_words
from lmforge.errors import UserError
from lmforge.evaluate.tasks import classification_metrics, format_confusion
from lmforge.finetuning.classify import label_names
from lmforge.model.classifier import TokenClassifier, text_batch, word_logits
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime, eval_mode

IGNORE = -100
"""The target of positions that carry no tag (a word's later sub-tokens, [CLS], [SEP], padding): no loss."""


def word_targets(example: EncodedWords, tag_ids: list[int]) -> list[int]:
    """One target per position: a word's tag id at its first sub-token, ``IGNORE`` everywhere else."""
    targets = [IGNORE] * len(example.ids)
    for position, tag in zip(example.firsts, tag_ids, strict=False):  # words past the cut have no position
        targets[position] = tag
    return targets


def tagging_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean cross-entropy over the tagged positions (each word's first sub-token)."""
    x, lengths, y = batch
    logits = model(x, lengths).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


class TokenClassifyTask:
    """A token classification fine-tuning task: its model (base + new head), batches, loss and evaluation."""

    trainable_modules = ["score"]
    """Trained in full even under LoRA: the new head."""
    compare_with_base = False
    """The base model has no head to evaluate before fine-tuning."""

    def __init__(self, cfg: FinetuneConfig, backbone: GPT | Encoder, tokenizer: Tokenizer, max_len: int, rt: Runtime):
        d = cfg.data
        framed = backbone.cfg.arch == "encoder"  # an encoder reads [CLS] words [SEP] (padded with [PAD])
        if framed and max_len < 3:
            raise UserError(f"data.max_length={max_len} leaves no room for a word between an encoder's [CLS] and "
                            f"[SEP]: give at least 3")
        self.rt, self.batch_size, self.pad = rt, cfg.train.batch_size, tokenizer.pad_id(framed)
        read = tagged_words(d.tokens_field, d.tags_field)

        def convert(r: dict[str, Any]) -> tuple[EncodedWords, list[str]]:
            words, tags = read(r)
            return encode_words(tokenizer, words, max_len, framed), tags

        report = ReadReport()
        train_rec, val_rec = read_train_val(d.train, d.val, d.val_fraction, d.seed, convert, d.skip_bad_lines, report)
        tags = label_names([t for (_, ts), _ in train_rec for t in ts], [(ts, where) for (_, ts), where in val_rec],
                           d.train, d.tags_field, "tag")
        index = {t: i for i, t in enumerate(tags)}
        self.tags = tags
        self.train = [x for (x, _), _ in train_rec]
        self.val = [x for (x, _), _ in val_rec]
        self.y_train = [word_targets(x, [index[t] for t in ts]) for (x, ts), _ in train_rec]
        # The val words' tag ids, flat, for the words that fit the context (as word_logits gives their logits).
        self.y_val = [index[t] for (x, ts), _ in val_rec for t in ts[:len(x.firsts)]]
        self.model = TokenClassifier(backbone, len(tags))
        self.n_train = len(self.train)
        truncated = sum(x.truncated for x in self.train + self.val)
        majority = max(Counter(self.y_val).values()) / len(self.y_val)
        self.summary = [f"token_classify: {len(self.train)} train / {len(self.val)} val texts "
                        f"({sum(len(x.firsts) for x in self.train)} / {len(self.y_val)} words), {len(tags)} tags "
                        f"({', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})",
                        f"{truncated} texts truncated to {max_len} tokens (their last words are neither learnt nor "
                        f"scored) | majority-tag val word accuracy {majority:.1%}", *report.summary()]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Training items -> (ids, lengths, targets per position) on the CPU."""
        x, lengths = text_batch([self.train[i].ids for i in indices], self.pad)
        y, _ = text_batch([self.y_train[i] for i in indices], IGNORE)
        return x, lengths, y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return tagging_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool) -> dict:
        """Val loss per word, word accuracy, macro P/R/F1 over tags; the final evaluation adds the confusion matrix."""
        with eval_mode(model):
            logits = torch.cat(word_logits(model, [x.ids for x in self.val], [x.firsts for x in self.val], self.pad,
                                           self.batch_size, self.rt.autocast))
        y = torch.tensor(self.y_val)
        metrics = classification_metrics(self.y_val, logits.argmax(-1).tolist(), len(self.tags))
        if not final:
            metrics.pop("confusion_matrix")
        return {"val_loss": F.cross_entropy(logits, y).item(),
                **{f"val_{k}" if k != "confusion_matrix" else k: v for k, v in metrics.items()}}

    def save_files(self, run_dir: Path) -> None:
        rundir.save_labels(run_dir, self.tags)

    def final_lines(self, metrics: dict) -> list[str]:
        """What the end of the run prints beyond the scalar metrics: the confusion matrix."""
        return [format_confusion(metrics["confusion_matrix"], self.tags)] if "confusion_matrix" in metrics else []
