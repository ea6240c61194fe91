"""Language-modelling evaluation: loss, perplexity and bits per byte over any amount of text (an
encoder's: masked-LM loss, accuracy and pseudo-perplexity on a prepared split, :func:`score_masked_split`; an
encoder-decoder's: denoising loss and reconstruction accuracy, :func:`score_denoising_split`).

Texts longer than the context are scored with a sliding window (the ``transformers`` perplexity
recipe): windows of ``block_size`` input tokens start every ``stride`` tokens, and each scores only
the next-token predictions no earlier window made, with everything before them in the window as
context. With a stride equal to the context every token is scored once with 0 to block_size - 1
tokens of context (fast); a smaller stride gives each token at least block_size - stride.

Every document is preceded by the end-of-text token, as in training, so its first token is scored
too and bits per byte cover every byte of the text. Files are read in pieces of about 1 MB and the
token buffer never holds more than one window plus one piece: memory stays flat for any file size.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.denoising import Infilling
from lmforge.data.loader import TokenShard, eval_offsets, open_split
from lmforge.data.masking import EvalBatches, Masking
from lmforge.data.prepare import load_meta
from lmforge.data.seq2seq import Seq2SeqTokens
from lmforge.data.sources import expand_sources, iter_documents, looks_binary
from lmforge.data.tokenizer import EncoderTokens, Tokenizer
from lmforge.errors import UserError
from lmforge.runtime import Runtime, eval_mode
from lmforge.training.metrics import bits_per_byte, perplexity
from lmforge.training.validation import denoising_metrics, masked_lm_metrics, split_loss

PIECE_BYTES = 1 << 20
PPPL_WINDOWS = 8
"""Windows whose every token an encoder's pseudo-perplexity scores (one forward pass per token)."""


@dataclass
class LMScore:
    """Running totals of a language-modelling evaluation."""

    nll: float = 0.0
    """Sum of the negative log-likelihoods (nats) of the scored tokens."""
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    """SHA-256 of the scored text (its UTF-8 bytes, in order)."""

    def as_dict(self) -> dict:
        loss = self.nll / max(1, self.tokens)
        return {"loss": loss, "perplexity": perplexity(loss),
                "bits_per_byte": bits_per_byte(loss, self.tokens, self.bytes), "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents, "data_sha256": self.sha256.hexdigest()}


def _file_pieces(path: Path) -> Iterator[str]:
    """A text file as pieces of ~1 MB that end at a newline (so no token straddles two pieces)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with open(path, "rb") as f:
        while chunk := f.read(PIECE_BYTES):
            text = carry + decoder.decode(chunk)
            cut = text.rfind("\n") + 1
            if cut == 0:  # no newline yet: keep reading (a single very long line)
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]
    rest = carry + decoder.decode(b"", final=True)
    if rest:
        yield rest


def documents(sources: list[str], text_field: str = "text") -> Iterator[tuple[str, Iterator[str]]]:
    """(where, pieces of its text) for each document: a text file, or a record of a .jsonl/.parquet file."""
    for path in expand_sources(sources):
        if path.suffix.lower() in (".jsonl", ".parquet"):
            for doc in iter_documents([str(path)], text_field):
                yield f"{doc.source}:{doc.line}", iter([doc.text])
        elif not looks_binary(path):
            yield str(path), _file_pieces(path)


@torch.no_grad()
def _nll(model: torch.nn.Module, windows: list[tuple[np.ndarray, int]], device: torch.device,
         autocast) -> float:
    """Summed NLL of windows: each (tokens, first) scores the targets tokens[first:] (first >= 1)."""
    T = max(len(w) for w, _ in windows)
    x = torch.zeros(len(windows), T - 1, dtype=torch.long)
    y = torch.full((len(windows), T - 1), -100, dtype=torch.long)
    for i, (w, first) in enumerate(windows):
        t = torch.from_numpy(w.astype(np.int64))
        x[i, :len(w) - 1] = t[:-1]
        y[i, first - 1:len(w) - 1] = t[first:]
    with autocast():
        logits, _ = model(x.to(device))
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                           reduction="sum").item()


def score_texts(model: torch.nn.Module, tokenizer: Tokenizer, docs: Iterator[tuple[str, Iterator[str]]], *,
                stride: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu",
                autocast=None, progress=None) -> LMScore:
    """Loss, perplexity and bits per byte of documents under the model (see the module docstring).

    progress(n_bytes) is called as text is consumed (a progress bar's update).
    """
    block = model.cfg.block_size
    stride = stride or block
    if not 0 < stride <= block:
        raise UserError(f"--stride must be between 1 and the model's context ({block}), got {stride}")
    autocast = autocast or contextlib.nullcontext
    device = torch.device(device)
    score = LMScore()
    pending: list[tuple[np.ndarray, int]] = []

    def flush() -> None:
        if pending:
            score.nll += _nll(model, pending, device, autocast)
            pending.clear()

    for _, pieces in docs:
        score.documents += 1
        buf = np.array([tokenizer.eot_id], dtype=np.int64)  # the context every document starts from
        base = 0  # absolute index of buf[0] in the document's token stream
        begin, scored_to = 0, 1  # next window start; tokens before scored_to are scored
        exhausted = False
        while True:
            while not exhausted and base + len(buf) < begin + block + 1:
                piece = next(pieces, None)
                if piece is None:
                    exhausted = True
                    break
                data = piece.encode("utf-8")
                score.bytes += len(data)
                score.sha256.update(data)
                if progress is not None:
                    progress(len(data))
                buf = np.concatenate([buf, np.asarray(tokenizer.encode(piece), dtype=np.int64)])
            known = base + len(buf)
            end = min(begin + block + 1, known)  # block inputs, each predicting the next token
            if end > scored_to:
                pending.append((buf[begin - base:end - base], scored_to - begin))
                score.tokens += end - scored_to
                scored_to = end
                if len(pending) == batch_size:
                    flush()
            if exhausted and end == known:
                break
            begin += stride
            buf, base = buf[begin - base:], begin
    flush()
    if score.tokens == 0:
        raise UserError("the evaluation text is empty: nothing to score")
    return score


def score_split(model: torch.nn.Module, dataset_dir: str | Path, rt: Runtime, split: str = "val",
                batch_size: int = 16) -> dict:
    """A prepared dataset's split, windowed exactly as training's final evaluation: the same figures."""
    meta = load_meta(Path(dataset_dir))
    shard = open_split(meta, split, model.cfg.block_size, model.cfg.vocab_size)
    loss = split_loss(model, shard, rt, batch_size, 10**9)
    counts = meta["splits"][split]
    return {"loss": loss, "perplexity": perplexity(loss),
            "bits_per_byte": bits_per_byte(loss, counts["tokens"], counts["bytes"]), "tokens": counts["tokens"],
            "bytes": counts["bytes"], "split": split, "data_sha256": meta.get("content_hash")}


def score_masked_split(model: torch.nn.Module, tokenizer: Tokenizer, dataset_dir: str | Path, rt: Runtime,
                       split: str, batch_size: int, seed: int, rate: float) -> dict:
    """An encoder's figures on a prepared dataset's split: the masked-LM loss and accuracy as training's final
    evaluation computes them (``batch_size``, ``seed`` and ``rate`` the run's: the same masks, the same figures),
    and the pseudo-perplexity (:func:`pseudo_perplexity`) of a sample of windows."""
    meta = load_meta(Path(dataset_dir))
    shard = open_split(meta, split, model.cfg.block_size, model.cfg.vocab_size)
    masking = Masking(tokenizer.encoder_tokens(), model.cfg.vocab_size, rate)
    loss, accuracy = masked_lm_metrics(model, EvalBatches(shard, masking, batch_size, 10**9, seed), rt)
    pppl, scored = pseudo_perplexity(model, shard, masking.tokens, rt)
    return {"loss": loss, "perplexity": perplexity(loss), "mlm_accuracy": accuracy, "pseudo_perplexity": pppl,
            "pseudo_perplexity_tokens": scored, "tokens": meta["splits"][split]["tokens"], "split": split,
            "data_sha256": meta.get("content_hash")}


def score_denoising_split(model: torch.nn.Module, tokenizer: Tokenizer, dataset_dir: str | Path, rt: Runtime,
                          split: str, batch_size: int, seed: int, noise_density: float, mean_noise_span: float) -> dict:
    """An encoder-decoder's figures on a prepared dataset's split: the denoising loss per target token and the
    reconstruction accuracy (target tokens predicted exactly, teacher-forced) as training's final evaluation computes
    them (``batch_size``, ``seed``, ``noise_density`` and ``mean_noise_span`` the run's: the same noise, the same
    figures). No bits per byte: the loss is conditioned on most of the text (its corrupted copy)."""
    meta = load_meta(Path(dataset_dir))
    shard = open_split(meta, split, model.cfg.block_size, model.cfg.vocab_size)
    infilling = Infilling(Seq2SeqTokens.of(tokenizer), model.cfg.block_size, noise_density, mean_noise_span)
    loss, accuracy = denoising_metrics(model, EvalBatches(shard, infilling, batch_size, 10**9, seed), rt)
    return {"loss": loss, "perplexity": perplexity(loss), "reconstruction_accuracy": accuracy,
            "tokens": meta["splits"][split]["tokens"], "split": split, "data_sha256": meta.get("content_hash")}


@torch.no_grad()
def pseudo_perplexity(model: torch.nn.Module, shard: TokenShard, tokens: EncoderTokens, rt: Runtime,
                      n_windows: int = PPPL_WINDOWS, rows: int = 64) -> tuple[float, int]:
    """(pseudo-perplexity, tokens scored) of an encoder (Salazar et al. 2020, "Masked Language Model Scoring"):
    every ordinary token of ``n_windows`` evenly spaced windows masked alone, one copy of its window each, and
    exp(-mean log p(token | the rest)). Costs one sequence per token, so it samples the split."""
    total, count = 0.0, 0
    special = torch.tensor(tokens.special)
    with eval_mode(model):
        for offset in eval_offsets(len(shard), shard.block_size, n_windows, 1):
            window = shard.windows(np.array([offset]))[0][0, :-1]
            x = torch.cat([torch.tensor([tokens.cls]), window])
            scored = torch.nonzero(~torch.isin(x, special)).flatten()
            for chunk in scored.split(rows):
                copies = x.repeat(len(chunk), 1)
                copies[torch.arange(len(chunk)), chunk] = tokens.mask
                with rt.autocast():
                    logits = model(copies.to(rt.device), masked=chunk[:, None].to(rt.device))[0]
                logp = F.log_softmax(logits[:, 0].float(), dim=-1).cpu()
                total -= logp[torch.arange(len(chunk)), x[chunk]].sum().item()
                count += len(chunk)
    return math.exp(total / max(count, 1)), count
