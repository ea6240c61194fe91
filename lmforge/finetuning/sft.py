"""Supervised fine-tuning on conversations: loss masking, padding or packing, and :class:`SFTTask`.

A record is ``{"prompt", "response"}`` (one user turn and its answer) or ``{"messages": [{"role",
"content"}, ...]}``. The conversation is rendered with a chat template (:mod:`lmforge.chat`: the
base model's own, or lmforge's default), and only the assistant turns are learned: every other
token's target is -100, which the loss ignores.

Packed rows hold several examples back to back; each example keeps its own positions (0, 1, ...)
and a block-diagonal causal mask stops attention at example boundaries, so a packed example
computes exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.chat import ROLES, ChatTemplate
from lmforge.config import FinetuneConfig
from lmforge.data.records import BadRecord, ReadReport, read_train_val, require
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate import generate
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime, eval_mode
from lmforge.training.metrics import perplexity

IGNORE = -100


def record_to_messages(record: dict, prompt_field: str, response_field: str, messages_field: str) -> list[dict]:
    """A record's conversation, checked; BadRecord names what is wrong."""
    if messages_field in record:
        messages = require(record, messages_field, list)
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise BadRecord(f"{messages_field}[{j}] should be {{\"role\": one of {', '.join(ROLES)}, "
                                f"\"content\": text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord(f"{messages_field} has no assistant message to learn")
        return messages
    if prompt_field not in record and response_field not in record:
        raise BadRecord(f"expected '{prompt_field}' and '{response_field}' fields, or '{messages_field}'")
    return [{"role": "user", "content": require(record, prompt_field)},
            {"role": "assistant", "content": require(record, response_field)}]


@dataclass
class Example:
    """One training example: inputs and next-token targets (IGNORE where nothing is learned)."""

    inputs: list[int]
    targets: list[int]
    truncated: bool = False


def encode_example(messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate, max_len: int) -> Example:
    """Tokenize a conversation, learn only the answers, keep at most ``max_len`` inputs."""
    ids: list[int] = []
    learn: list[bool] = []
    for text, is_answer in template.segments(messages):
        piece = tokenizer.encode(text, allow_special=True)
        ids += piece
        learn += [is_answer] * len(piece)
    truncated = len(ids) > max_len + 1
    ids, learn = ids[:max_len + 1], learn[:max_len + 1]
    # Position t predicts token t+1: its target counts if token t+1 belongs to an answer.
    targets = [tok if keep else IGNORE for tok, keep in zip(ids[1:], learn[1:], strict=True)]
    return Example(ids[:-1], targets, truncated)


def has_answer(example: Example) -> bool:
    """Whether any of the example's tokens is learned (truncation can cut the whole answer off)."""
    return any(t != IGNORE for t in example.targets)


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), right-padded to the longest example; pads are never learned."""
    T = max(len(e.inputs) for e in examples)
    x = torch.tensor([e.inputs + [pad_id] * (T - len(e.inputs)) for e in examples])
    y = torch.tensor([e.targets + [IGNORE] * (T - len(e.targets)) for e in examples])
    return x, y


@dataclass
class PackedRow:
    inputs: list[int]
    targets: list[int]
    positions: list[int]
    segments: list[int]
    """Which example each slot belongs to (-1: padding)."""


def pack_examples(examples: list[Example], block_size: int, pad_id: int) -> list[PackedRow]:
    """First-fit packing, in the given order, into rows of ``block_size`` slots."""
    rows: list[PackedRow] = []
    free: list[int] = []  # free slots per row
    for e in examples:
        n = len(e.inputs)
        r = next((i for i, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append(PackedRow([], [], [], []))
            free.append(block_size)
            r = len(rows) - 1
        row = rows[r]
        seg = max(row.segments, default=-1) + 1
        row.inputs += e.inputs
        row.targets += e.targets
        row.positions += range(n)
        row.segments += [seg] * n
        free[r] -= n
    for row, f in zip(rows, free, strict=True):
        row.inputs += [pad_id] * f
        row.targets += [IGNORE] * f
        row.positions += [0] * f
        row.segments += [-1] * f
    return rows


def packed_batch(rows: list[PackedRow]) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, mask): the mask is causal and block-diagonal over examples.

    Padding slots form a block of their own, in which each slot still sees itself, so no row of
    the mask is empty (an all-masked row gives NaN in some attention kernels).
    """
    x = torch.tensor([r.inputs for r in rows])
    y = torch.tensor([r.targets for r in rows])
    pos = torch.tensor([r.positions for r in rows])
    seg = torch.tensor([r.segments for r in rows])
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return x, y, pos, mask[:, None]


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean cross-entropy over the learned (answer) tokens of a padded or packed batch."""
    if len(batch) == 2:
        return model(batch[0], batch[1])[1]
    x, y, positions, mask = batch
    return model(x, y, positions=positions, mask=mask)[1]


class SFTTask:
    """A chat fine-tuning task: examples rendered with the chat template, answers-only loss, val loss,
    and greedy exact match on held-out prompts at the end (and before, for comparison)."""

    trainable_modules = None
    """Under LoRA only the adapters train."""

    def __init__(self, cfg: FinetuneConfig, model: GPT, tokenizer: Tokenizer, base_dir: Path, max_len: int,
                 rt: Runtime):
        d = cfg.data
        self.model, self.tokenizer, self.rt, self.batch_size = model, tokenizer, rt, cfg.train.batch_size
        self.template = ChatTemplate.resolve(d.chat_template, base_dir, tokenizer)
        self.pad = tokenizer.eot_id
        report = ReadReport()
        train_rec, val_rec = read_train_val(
            d.train, d.val, d.val_fraction, d.seed,
            lambda r: record_to_messages(r, d.prompt_field, d.response_field, d.messages_field),
            d.skip_bad_lines, report)
        self.train = [encode_example(m, tokenizer, self.template, max_len) for m, _ in train_rec]
        self.val = [encode_example(m, tokenizer, self.template, max_len) for m, _ in val_rec]
        n_trunc = sum(e.truncated for e in self.train + self.val)
        unlearnable = [w for e, (_, w) in zip(self.train, train_rec, strict=True) if not has_answer(e)]
        if len(unlearnable) == len(self.train):
            raise UserError(f"no training example keeps an answer token within data.max_length={max_len}")
        # An example whose answer was cut off entirely teaches nothing, and a batch of only such examples
        # would have no token to average its loss over (0/0 = NaN): dropped here, and counted.
        self.train = [e for e in self.train if has_answer(e)]
        self.rows = pack_examples(self.train, max_len, self.pad) if d.packing else None
        self.n_train = len(self.rows) if self.rows is not None else len(self.train)
        self.compare_with_base = d.eval_generations > 0
        # Exact match: answer the val prompts whose last turn is the answer.
        self.qa = [(m[:-1], m[-1]["content"]) for m, _ in val_rec if m[-1]["role"] == "assistant"]
        self.qa = self.qa[:d.eval_generations]
        self.prompts = [tokenizer.encode(self.template.render(m, add_generation_prompt=True), allow_special=True)
                        for m, _ in self.qa]
        self.max_answer = max((len(tokenizer.encode(a)) for _, a in self.qa), default=0) + 8
        batches = f"packed into {len(self.rows)} rows" if self.rows else "padded to the longest example"
        self.summary = [
            f"sft: {len(self.train)} train / {len(self.val)} val examples from {d.train}"
            + (f" and {d.val}" if d.val else f" (val_fraction {d.val_fraction})"),
            f"tokens per example: max {max(len(e.inputs) for e in self.train)}, limit {max_len}; "
            f"{n_trunc} truncated" + (f"; {len(unlearnable)} train examples with no answer token left dropped "
                                      f"(e.g. {unlearnable[0]})" if unlearnable else ""),
            f"batches: {batches} | chat template: {'lmforge default' if self.template.is_default else 'own'}, "
            f"answers end with {self.template.eos_token}",
            *report.summary()]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Training items -> a padded (inputs, targets) or packed (inputs, targets, positions, mask) batch."""
        if self.rows is not None:
            return packed_batch([self.rows[i] for i in indices])
        return pad_batch([self.train[i] for i in indices], self.pad)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sft_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool) -> dict:
        """Val loss and perplexity over the answer tokens; the final evaluation adds exact match."""
        total, count = 0.0, 0
        with eval_mode(model):
            for i in range(0, len(self.val), self.batch_size):
                x, y = (t.to(self.rt.device) for t in pad_batch(self.val[i:i + self.batch_size], self.pad))
                n = int((y != IGNORE).sum())
                if n:
                    with self.rt.autocast():
                        total += float(model(x, y)[1]) * n
                    count += n
            loss = total / max(1, count)
            metrics: dict = {"val_loss": loss, "val_ppl": perplexity(loss)}
            if final and self.qa:
                answers = self._answers(model)
                hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, self.qa, strict=True)]
                metrics["exact_match"] = sum(hits) / len(hits)
                metrics["samples"] = [{"prompt": p[-1]["content"] if p else "", "reference": ref, "answer": a}
                                      for a, (p, ref) in list(zip(answers, self.qa, strict=True))[:5]]
        return metrics

    def _answers(self, model: nn.Module, batch_size: int = 16) -> list[str]:
        """Greedy answers to the val prompts, stopping at the end-of-answer token."""
        gpt = _unwrap(model)
        out = []
        for i in range(0, len(self.prompts), batch_size):
            with self.rt.autocast():
                ids = generate(gpt, self.prompts[i:i + batch_size], self.max_answer, temperature=0.0,
                               stop_ids=self.template.stop_ids, pad_id=self.pad)
            out += [self.tokenizer.decode(x) for x in ids]
        return out

    def save_files(self, run_dir: Path) -> None:
        self.template.save(run_dir)

    def final_lines(self, metrics: dict) -> list[str]:
        return []


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the KV cache methods: past torch.compile's and peft's wrappers."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
