"""What an application is, as data: how its records are built, how a record becomes a prompt, its
simple baselines and the metric it is judged by."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.apps.task_records import TaskRecord


@dataclass(frozen=True)
class App:
    name: str
    summary: str
    build: Callable[..., list[TaskRecord]]
    """(sources, report, **options) -> records; no sources means this machine's own text."""
    prompt: Callable[[TaskRecord, TaskRecord], str]
    """(record, its nearest training example) -> the user turn the model answers."""
    metric: str
    """The main metric (a key of lmforge.evaluate.tasks.generation_metrics) the model is judged by."""
    metrics: tuple[str, ...]
    """The metrics the report shows."""
    test_fraction: float
    max_new_tokens: int
    baselines: dict[str, Callable[[TaskRecord], str]] = field(default_factory=dict)
    """Baselines that look at the record alone (copy, lead); nearest neighbour is every app's."""
    majority: bool = False
    """Also score the most frequent training target given to every record (qa: one of the entry numbers)."""
    distinct_targets: bool = True
    """No test target may recur in train (see :func:`~lmforge.apps.task_records.split_records`)."""
    options: tuple[str, ...] = ()
    """Keyword options ``build`` takes (translation: lang)."""
    pretrain_text: Callable[[list[TaskRecord]], list[str]] | None = None
    """The texts, drawn from the training records alone, that the app's own base is pretrained on (by its recipe
    ``configs/apps/base/NAME.yaml``, with a tokenizer trained on them); None: the app fine-tunes the default run."""
    dev_fraction: float = 0.0
    """Share of the training records (by group) held out of fine-tuning and pretraining as dev records: the
    fine-tuning's validation set, and where the memory threshold is chosen (see ``memory``); 0: none."""
    self_matches: float = 0.0
    """Share of fine-tuning records also given with themselves as their nearest example (a translation memory's
    exact match), so that the model learns early to copy what the memory has right (needs dev_fraction)."""
    memory: bool = False
    """The app answers with the nearest training example's target (the memory's match) where its similarity is at
    least a threshold, and with the model's answer below it: the threshold that scores best on the dev records
    (translation tools use a memory's close matches and machine translation for the rest)."""
    beams: int = 1
    """Also write the test records' answers with beam search over this many hypotheses (encoder-decoder models);
    the main figure is then the beam's, greedy's beside it (unless greedy_main)."""
    greedy_main: bool = False
    """The app's answers are greedy's even with beams (summarization: beam search scored lower ROUGE-L in every run
    measured, BENCHMARKS.md), the beam's beside them."""
    breakdown: Callable[[list[dict], list[str]], dict] | None = None
    """(test rows as written, one output per row) -> figures the report adds for any output (translation: by the
    memory's similarity band, placeholders kept)."""
    part: Callable[[dict], str] | None = None
    """(a test row as written) -> the part of the task it belongs to (summarization: code, man pages): the report
    gives each part's figures beside its own strongest baseline, and the model must beat that bar on every part."""
