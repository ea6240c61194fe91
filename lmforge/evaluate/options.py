"""The options of ``lmforge eval``, ``predict`` and ``compare`` (no PyTorch here: the command line is made from
them before any model code loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.options import GREEDY, DeviceOptions, RuntimeOptions, Sampling, Search, check, option


@dataclass
class EvalRequest:
    """What ``lmforge eval`` measures; nothing requested: a pretraining run's own val split."""

    lm: list[str] = option([], nargs="+", metavar="SRC")
    """Text files/folders/globs (.jsonl/.parquet: a text field): loss, perplexity, bits per byte."""
    stride: int | None = None
    """--lm: sliding-window stride in tokens (default: the context: disjoint windows)."""
    dataset: str | None = option(None, metavar="DIR")
    """A prepared dataset: its split, windowed exactly as training evaluates it."""
    split: Literal["train", "val"] = "val"
    """The --dataset split to score."""
    pairs: str | None = option(None, metavar="FILE")
    """JSONL of prompt + reference (encoder-decoder runs): loss and perplexity of each reference given its prompt as
    the source (teacher-forced; per target token, end-of-text included, as fine-tuning's val_loss) (default: none)."""
    generate: str | None = option(None, metavar="FILE")
    """JSONL of prompt (an encoder-decoder run: the source) + reference(s): BLEU, chrF, ROUGE, exact match."""
    choice: str | None = option(None, metavar="FILE")
    """JSONL of context + choices + label: multiple-choice accuracy."""
    classify: str | None = option(None, metavar="FILE")
    """CSV/JSONL of text + label (classification runs)."""
    text_field: str = "text"
    """The text's field in --lm .jsonl/.parquet and --classify files."""
    label_field: str = "label"
    """The label's field in --classify files."""
    batch_size: int = 8
    """Sequences per batch."""
    max_new_tokens: int = option(64, short="-n")
    """--generate: tokens per answer at most."""
    stop: list[str] = option([])
    """--generate: stop where the answer contains this string, taken literally; repeatable (default: none)."""
    chat: bool = False
    """--generate: wrap each prompt as a user turn of the run's chat template (fine-tuned runs); its answer ends at
    the turn's end."""
    sampling: Sampling = option(GREEDY)
    search: Search = option(Search())

    def __post_init__(self) -> None:
        for name in ("stride", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, "an integer of at least 1", value)
        self.search.check_sampling(self.sampling)


@dataclass
class EvalOptions(RuntimeOptions):
    """Measure a model: perplexity/bits per byte, generation and choice tasks.

    Evaluate a run, checkpoint or Hugging Face folder; prints a table and writes JSON.
    """

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    output: str | None = option(None, short="-o")
    """JSON report path (default: RUN/eval.json, or ./eval.json)."""
    request: EvalRequest = option(EvalRequest())


@dataclass
class PredictOptions(DeviceOptions):
    """Label texts with a classification run."""

    run: str = option(positional=True)
    """Classification run directory or checkpoint."""
    text: list[str] = option([])
    """A text to label (repeatable; default: none)."""
    file: str | None = None
    """.txt (one text per line), .jsonl or .csv file of texts (default: none)."""
    text_field: str = "text"
    """The text's field in a .jsonl or .csv file."""
    label_field: str = "label"
    """The label's field in a .jsonl or .csv file: if every text has one, accuracy is reported."""
    output: str | None = None
    """Write the predictions as JSONL here (default: printed only)."""


@dataclass
class CompareOptions:
    """Final metrics of several runs side by side, and one PNG of their loss curves."""

    runs: list[str] = option([], positional=True, nargs="+")
    """Run directories."""
    png: str = "compare.png"
    """Where to write the loss curves."""
    bpb: bool = False
    """Plot bits per byte instead of loss per token: runs with different tokenizers on one axis."""
