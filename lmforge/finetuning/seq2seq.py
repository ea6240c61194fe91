"""Sequence-to-sequence fine-tuning of an encoder-decoder: records of a source and its target -> :class:`Seq2SeqTask`.

A record is ``{"prompt": source, "reference": target}``, what ``lmforge app`` writes (``data.prompt_field`` names
another source field). The encoder reads the source; the decoder learns to write the target and then end-of-text
(:mod:`lmforge.data.seq2seq`'s framing, the one generation and export use). Only the target carries loss: the labels
are the decoder's, so no source token is ever one, and padding's labels are -100.

Each batch is padded to its longest source and target. A pair longer than the context on either side is truncated
(the beginning kept) and counted in one warning, not refused: summarization sources are routinely longer than the
context. Each evaluation reports the validation loss and perplexity per target token
(:func:`lmforge.evaluate.seq2seq.target_nll`, the figure ``lmforge eval`` reports for the run).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from lmforge.config import FinetuneConfig
from lmforge.data.records import ReadReport, read_train_val
from lmforge.data.seq2seq import collate_pairs
from lmforge.data.tokenizer import Tokenizer
from lmforge.evaluate.seq2seq import TARGET_FIELD, encode_checked, pair_reader, target_nll
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.runtime import Runtime
from lmforge.training.metrics import perplexity


def seq2seq_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (and their end-of-text) of a batch (src, src_mask, tgt, labels)."""
    src, src_mask, tgt, labels = batch
    return model(src, tgt, labels, src_mask=src_mask)[1]


class Seq2SeqTask:
    """A sequence-to-sequence fine-tuning task: framed pairs, target-only loss, val loss and perplexity."""

    trainable_modules = None
    """Under LoRA only the adapters train (on both sides, cross-attention included: see lmforge.model.lora)."""
    compare_with_base = False
    """No answers to score before and after (SFT's exact match): the val loss curve shows the change."""

    def __init__(self, cfg: FinetuneConfig, model: EncoderDecoder, tokenizer: Tokenizer, max_len: int, rt: Runtime):
        d = cfg.data
        self.model, self.rt, self.batch_size = model, rt, cfg.train.batch_size
        report = ReadReport()
        train_rec, val_rec = read_train_val(d.train, d.val, d.val_fraction, d.seed,
                                            pair_reader(d.prompt_field, TARGET_FIELD), d.skip_bad_lines, report)
        base = f"base '{cfg.base}'"
        self.train = encode_checked(tokenizer, [p for p, _ in train_rec], max_len, model.cfg.vocab_size, base)
        self.val = encode_checked(tokenizer, [p for p, _ in val_rec], max_len, model.cfg.vocab_size, base)
        self.pad = self.train.pad
        for pairs, name in ((self.train, d.train), (self.val, d.val or f"{d.train} (held out)")):
            warning = pairs.truncation_warning(max_len, name)
            if warning:
                warnings.warn(warning, stacklevel=2)
        self.n_train = len(self.train.sources)
        self.summary = [
            f"seq2seq: {self.n_train} train / {len(self.val.sources)} val pairs from {d.train}"
            + (f" and {d.val}" if d.val else f" (val_fraction {d.val_fraction})"),
            f"tokens per pair (with end-of-text): source max {max(len(s) for s in self.train.sources)}, target max "
            f"{max(len(t[1]) for t in self.train.targets)}, limit {max_len} each; truncated: "
            f"{self.train.cut_sources + self.val.cut_sources} sources, "
            f"{self.train.cut_targets + self.val.cut_targets} targets",
            *report.summary()]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Training items -> (src, src_mask, decoder input, labels) on the CPU, padded to the batch's longest."""
        return collate_pairs([self.train.sources[i] for i in indices], [self.train.targets[i] for i in indices],
                             self.pad)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return seq2seq_loss(model, batch)

    def evaluate(self, model: nn.Module, final: bool) -> dict:
        """Val loss and perplexity per target token."""
        nll, n = target_nll(model, self.val.sources, self.val.targets, self.pad, self.rt, self.batch_size)
        loss = nll / n
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    def save_files(self, run_dir: Path) -> None:
        """Nothing beyond the tokenizer (which holds the framing's [PAD] and [MASK])."""

    def final_lines(self, metrics: dict) -> list[str]:
        return []
