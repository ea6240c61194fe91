"""Timing models against each other on a machine whose speed drifts (other work, frequency scaling): in
alternation, round after round, each ratio taken within its round, every figure given as the median with its
spread over the rounds (min-max). Timed one after the other instead, one model can meet a busy minute and the
other a quiet one, and their ratio measures the machine's load rather than the models.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROUNDS = 5
"""Timed rounds of each model (after one untimed warm-up of each)."""


@dataclass
class Spread:
    """One figure over the rounds: its median, its extremes, and the value of every round in order."""

    median: float
    min: float
    max: float
    rounds: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), list(values))

    @property
    def includes_one(self) -> bool:
        """A ratio that was at or below 1.0 in one round and at or above it in another: no measurable
        difference."""
        return self.min <= 1.0 <= self.max


def time_alternating(runs: Sequence[Callable[[], object]], rounds: int = ROUNDS,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds each of ``runs`` took in each round: one untimed warm-up of each, then ``rounds`` rounds in which
    each runs once in turn (a, b, a, b, ...). Returns one list of ``rounds`` timings per run."""
    for run in runs:
        run()
    seconds: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, timings in zip(runs, seconds, strict=True):
            start = clock()
            run()
            timings.append(clock() - start)
    return seconds


def ratio_per_round(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """numerator / denominator round by round (both timed in the same round), as a spread."""
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def format_spread(s: Spread, digits: int) -> str:
    """'median (min-max)'."""
    return f"{s.median:,.{digits}f} ({s.min:,.{digits}f}-{s.max:,.{digits}f})"


def format_ratio(s: Spread) -> str:
    """'1.520x (1.41-1.60x)', or 'no measurable difference (0.91-1.08x)' when the rounds disagree on which side of
    1.0 the ratio is."""
    extremes = f"({s.min:.2f}-{s.max:.2f}x)"
    return f"no measurable difference {extremes}" if s.includes_one else f"{s.median:.3f}x {extremes}"
