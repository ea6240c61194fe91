"""The options of ``lmforge app`` (no PyTorch here: the command line is made from them before any model code
loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.options import check, option

DEFAULT_BASE = "runs/default"
"""Where that recipe writes its run; the apps start from it (and train it with that recipe when it is missing)."""


@dataclass
class AppRequest:
    """An application end to end: translation, summarization or qa from local text.

    Build the task's records from this machine's text (or SOURCES), split them, pretrain the app's own base on the
    training records' text (or take --base), fine-tune it on them, evaluate on the held-out split beside the
    simple baselines, and write OUT/report.md and results.json.
    """

    name: Literal["translation", "summarization", "qa"] = option(positional=True)
    """The application."""
    sources: list[str] = option([], positional=True)
    """translation: .po/.mo files or folders (default: the system's catalogs for --lang); summarization: .py files,
    man pages or folders of them (default: the standard library and the system's manual); qa: .py files or folders
    (default: the standard library)."""
    lang: str = "de"
    """translation: the language to translate English into."""
    out_dir: str | None = option(None, flag="out")
    """Output folder (default runs/apps/NAME-seedN)."""
    base: str | None = None
    """The run to fine-tune instead of the app's own base (default: each app pretrains its own in OUT/base;
    runs/default is trained first if it is given and missing)."""
    budget_minutes: float | None = None
    """Minutes of training, pretraining and fine-tuning together, shared between them as the app's recipe shares
    them (default: the recipe's own, sized for a 2-core CPU; more on a stronger machine)."""
    seed: int = 0
    """Seed of the app's own base (its pretraining) and of the fine-tuning (the split has its own, --split-seed, so
    that seeds compare on the same records)."""
    split_seed: int = 0
    """Seed of the train/test split."""
    test_fraction: float | None = None
    """Held-out fraction of the records (default: the app's)."""
    max_test: int | None = None
    """Evaluate on the first N test records only (default: all)."""
    overrides: list[str] = option([], flag="set", metavar="KEY=VALUE")
    """An override on top of the app's fine-tuning recipe, e.g. train.budget_minutes=2, or with base. in front on
    top of its own base recipe, e.g. base.model.n_layer=3; repeatable (default: none)."""
    data_only: bool = False
    """Build and write the data, then stop."""

    def __post_init__(self) -> None:
        check(self.test_fraction is None or 0 < self.test_fraction < 1, "test_fraction", "a number between 0 and 1",
              self.test_fraction)
        check(self.budget_minutes is None or self.budget_minutes > 0, "budget_minutes", "a positive number of "
              "minutes", self.budget_minutes)
        check(self.max_test is None or self.max_test >= 1, "max_test", "an integer of at least 1", self.max_test)
