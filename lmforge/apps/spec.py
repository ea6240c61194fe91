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
    """Also score the most frequent training target given to every record (qa: "None")."""
    distinct_targets: bool = True
    """No test target may recur in train (see :func:`~lmforge.apps.task_records.split_records`)."""
    options: tuple[str, ...] = ()
    """Keyword options ``build`` takes (translation: lang)."""
