"""What pretraining optimizes, one object per architecture: the decoder's next token (:class:`NextToken`), the
encoder's masked tokens (:class:`MaskedTokens`, BERT) and the encoder-decoder's denoising (:class:`Denoising`,
BART's text infilling).

Each says the same things to :mod:`lmforge.training.pretrain`: its batches, its loss, its validation figures,
its FLOPs per token, the closing line's figure and next commands, and the samples printed at the end. The loop,
checkpoints, processes and metrics are the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lmforge import rundir
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.denoising import Infilling
from lmforge.data.loader import BatchSampler, TokenShard
from lmforge.data.masking import EvalBatches, MaskedBatchSampler, Masking
from lmforge.data.seq2seq import Seq2SeqTokens
from lmforge.data.tokenizer import Tokenizer
from lmforge.generate import generate_text
from lmforge.generate_seq2seq import generate_seq2seq
from lmforge.model import flops_per_token
from lmforge.options import Sampling
from lmforge.runtime import Runtime
from lmforge.training.metrics import bits_per_byte, perplexity
from lmforge.training.parallel import Parallel
from lmforge.training.validation import denoising_metrics, masked_lm_metrics, split_loss


class Objective(Protocol):
    """One architecture's pretraining objective (see the module docstring)."""

    task: rundir.Task

    def sampler(self, shard: TokenShard, batch_size: int, seed: int, rank: int, world_size: int) -> BatchSampler:
        """The training batches: a pure function of (seed, step, global micro-batch)."""

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The scalar loss of a micro-batch, through the module steps run through (DDP's, compiled)."""

    def evaluate(self, model: torch.nn.Module, shard: TokenShard, batch_size: int, n_batches: int, seed: int,
                 rt: Runtime, par: Parallel) -> dict[str, float]:
        """The validation figures (``val_loss`` first) over ``n_batches`` fixed batches of the split."""

    def flops_per_token(self, cfg: ModelConfig, n_params: int) -> float:
        """Training FLOPs per token of the context (the header's figure, MFU's numerator)."""

    def figure(self, metrics: dict[str, float]) -> str:
        """The closing line's figure beside the val loss."""

    def next_commands(self, run_dir: Path) -> list[str]:
        """What to do with the pretrained model (beside ``lmforge eval`` and ``lmforge export``)."""

    def print_samples(self, model: torch.nn.Module, tokenizer: Tokenizer, cfg: TrainConfig, shard: TokenShard,
                      rt: Runtime) -> None:
        """What the trained model makes of text, printed at the end (the main process; ``shard``: the val split)."""


def objective_for(cfg: TrainConfig, tokenizer: Tokenizer, val_split: dict) -> Objective:
    """The objective ``cfg.model.arch`` trains by. An encoder needs [CLS] [SEP] [MASK] [PAD], an encoder-decoder [PAD]
    and [MASK]: a vocabulary without them (BPE, characters) gets them appended to ``tokenizer``, whose tokenizer.json
    the run keeps. ``val_split``: the val split's token and byte counts (meta.json's), for bits per byte."""
    tc = cfg.train
    if cfg.model.arch == "encoder":
        return MaskedTokens(Masking(tokenizer.encoder_tokens(), tokenizer.vocab_size, tc.mlm_probability))
    if cfg.model.arch == "encoder_decoder":
        return Denoising(Infilling(Seq2SeqTokens.of(tokenizer), cfg.model.block_size, tc.noise_density,
                                   tc.mean_noise_span))
    return NextToken(val_split["tokens"], val_split["bytes"])


@dataclass(frozen=True)
class NextToken:
    """A decoder's: every next token of windows of the stream."""

    val_tokens: int
    val_bytes: int
    task: rundir.Task = "lm"

    def sampler(self, shard: TokenShard, batch_size: int, seed: int, rank: int, world_size: int) -> BatchSampler:
        return BatchSampler(shard, batch_size, seed, rank, world_size)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(*batch)[1]

    def evaluate(self, model: torch.nn.Module, shard: TokenShard, batch_size: int, n_batches: int, seed: int,
                 rt: Runtime, par: Parallel) -> dict[str, float]:
        loss = split_loss(model, shard, rt, batch_size, n_batches, par)
        return {"val_loss": loss, "val_ppl": perplexity(loss),
                "val_bpb": bits_per_byte(loss, self.val_tokens, self.val_bytes)}

    def flops_per_token(self, cfg: ModelConfig, n_params: int) -> float:
        return flops_per_token(cfg, n_params)

    def figure(self, metrics: dict[str, float]) -> str:
        return f"{metrics['val_bpb']:.4f} bits/byte"

    def next_commands(self, run_dir: Path) -> list[str]:
        return [f"lmforge generate {run_dir} -p TEXT"]

    def print_samples(self, model: torch.nn.Module, tokenizer: Tokenizer, cfg: TrainConfig, shard: TokenShard,
                      rt: Runtime) -> None:
        s = cfg.sample
        prompts = [s.prompt] * s.num_samples
        with rt.autocast():
            texts = generate_text(model, tokenizer, prompts, s.max_new_tokens,
                                  Sampling(temperature=s.temperature, top_k=s.top_k, seed=cfg.train.seed))
        for i, text in enumerate(texts):
            print(f"\n--- sample {i + 1} ---\n{s.prompt}{text}")


@dataclass(frozen=True)
class MaskedTokens:
    """An encoder's (BERT's masked-language modelling, :mod:`lmforge.data.masking`)."""

    masking: Masking
    task: rundir.Task = "mlm"

    def sampler(self, shard: TokenShard, batch_size: int, seed: int, rank: int, world_size: int) -> BatchSampler:
        return MaskedBatchSampler(shard, batch_size, seed, self.masking, rank, world_size)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, positions, targets = batch
        return model(x, targets, masked=positions)[1]

    def evaluate(self, model: torch.nn.Module, shard: TokenShard, batch_size: int, n_batches: int, seed: int,
                 rt: Runtime, par: Parallel) -> dict[str, float]:
        loss, accuracy = masked_lm_metrics(model, EvalBatches(shard, self.masking, batch_size, n_batches, seed), rt,
                                           par)
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_mlm_accuracy": accuracy}

    def flops_per_token(self, cfg: ModelConfig, n_params: int) -> float:
        # The output layer (and the dense layer before it) runs on the masked positions only.
        head = (1 - self.masking.rate) * (cfg.vocab_size + cfg.n_embd) * cfg.n_embd
        return flops_per_token(cfg, round(n_params - head))

    def figure(self, metrics: dict[str, float]) -> str:
        return f"{metrics['val_mlm_accuracy']:.1%} of masked tokens right"

    def next_commands(self, run_dir: Path) -> list[str]:
        return [f"lmforge finetune task=classify base={run_dir} data.train=FILE"]

    @torch.no_grad()
    def print_samples(self, model: torch.nn.Module, tokenizer: Tokenizer, cfg: TrainConfig, shard: TokenShard,
                      rt: Runtime) -> None:
        """``n`` validation sequences as the model saw them, each masked token shown as [the model's guess|the
        truth] (one sign each: = right, x wrong)."""
        batches = EvalBatches(shard, self.masking, 1, 10**9, cfg.train.seed)
        n = cfg.sample.num_samples
        model.eval()
        for i in range(min(n, len(batches))):
            x, positions, targets = (t.to(rt.device) for t in batches[len(batches) * i // n])
            with rt.autocast():
                guesses = model(x, masked=positions)[0].argmax(-1)[0].tolist()
            ids = x[0].tolist()
            for pos, guess, truth in zip(positions[0].tolist(), guesses, targets[0].tolist(), strict=True):
                if truth != -100:
                    mark = "=" if guess == truth else "x"
                    ids[pos] = f"[{tokenizer.decode([guess])}{mark}{tokenizer.decode([truth])}]"
            text = "".join(t if isinstance(t, str) else tokenizer.decode([t]) for t in ids[1:40])
            print(f"\n--- fill-mask sample {i + 1} (first 40 tokens; [guess=truth] right, [guessxtruth] wrong) ---\n"
                  f"{text}")


@dataclass(frozen=True)
class Denoising:
    """An encoder-decoder's (BART's text infilling, :mod:`lmforge.data.denoising`): write back a window of the stream
    from a copy with spans hidden.

    No bits per byte: the loss is the code length of the text given most of it (the corrupted copy the encoder
    reads), not of the text alone, so it is no compression figure and compares with no decoder's. The figure
    beside it is the reconstruction accuracy: the share of target tokens predicted exactly, teacher-forced."""

    infilling: Infilling
    task: rundir.Task = "seq2seq"

    def sampler(self, shard: TokenShard, batch_size: int, seed: int, rank: int, world_size: int) -> BatchSampler:
        return MaskedBatchSampler(shard, batch_size, seed, self.infilling, rank, world_size)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        src, src_mask, tgt, labels = batch
        return model(src, tgt, labels, src_mask=src_mask)[1]

    def evaluate(self, model: torch.nn.Module, shard: TokenShard, batch_size: int, n_batches: int, seed: int,
                 rt: Runtime, par: Parallel) -> dict[str, float]:
        loss, accuracy = denoising_metrics(model, EvalBatches(shard, self.infilling, batch_size, n_batches, seed),
                                           rt, par)
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_reconstruction_accuracy": accuracy}

    def flops_per_token(self, cfg: ModelConfig, n_params: int) -> float:
        # A token is a window position: the encoder reads it (padded source: every position is computed) and the
        # decoder writes it, so both sides' parameters count once each; the decoder's attention counts twice
        # (flops_per_token: to what it wrote, and to the source).
        return flops_per_token(cfg, n_params)

    def figure(self, metrics: dict[str, float]) -> str:
        return f"{metrics['val_reconstruction_accuracy']:.1%} of target tokens right"

    def next_commands(self, run_dir: Path) -> list[str]:
        return [f"lmforge finetune task=seq2seq base={run_dir} data.train=FILE",
                f"lmforge generate {run_dir} -p TEXT"]

    def print_samples(self, model: torch.nn.Module, tokenizer: Tokenizer, cfg: TrainConfig, shard: TokenShard,
                      rt: Runtime) -> None:
        """``n`` validation windows as the encoder read them (each hidden span one [MASK]) and as the model writes
        them back, greedily, with the share of the window it got right (position by position)."""
        batches = EvalBatches(shard, self.infilling, 1, 10**9, cfg.train.seed)
        n = min(cfg.sample.num_samples, len(batches))
        shown = [batches[len(batches) * i // n] for i in range(n)]
        sources = [src[0][src_mask[0]].tolist() for src, src_mask, _, _ in shown]  # each ends with end-of-text
        with rt.autocast():
            written = generate_seq2seq(model, sources, self.infilling.block_size, self.infilling.tokens,
                                       temperature=0.0)
        for i, (source, out, (_, _, _, labels)) in enumerate(zip(sources, written, shown, strict=True)):
            truth = labels[0].tolist()[:-1]  # the window, without its end-of-text
            right = sum(a == b for a, b in zip(out, truth, strict=False)) / len(truth)
            print(f"\n--- denoising sample {i + 1} (the source, then the model's greedy reconstruction: {right:.0%} of "
                  f"the window's tokens right) ---\n{tokenizer.decode(source[:-1])}\n>>>\n{tokenizer.decode(out)}")
