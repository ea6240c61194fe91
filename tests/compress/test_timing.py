"""Timing in alternation: the order things run in, the median and spread, the ratio round by round, and the
wording of a ratio whose rounds disagree."""

from __future__ import annotations

import pytest

from lmforge.compress.timing import Spread, format_ratio, format_spread, ratio_per_round, time_alternating


def test_runs_alternate_after_a_warm_up_of_each_and_each_round_is_timed_on_its_own():
    now, order = [0.0], []

    def run(name: str, seconds: float):
        def go() -> None:
            order.append(name)
            now[0] += seconds
        return go

    seconds = time_alternating([run("a", 2.0), run("b", 3.0)], rounds=3, clock=lambda: now[0])
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert seconds == [[2.0] * 3, [3.0] * 3]


def test_a_spread_is_the_median_and_extremes_of_the_rounds_and_a_ratio_is_taken_within_each_round():
    assert Spread.of([3.0, 1.0, 2.0, 10.0, 2.5]) == Spread(2.5, 1.0, 10.0, [3.0, 1.0, 2.0, 10.0, 2.5])
    assert format_spread(Spread.of([30.0, 6.9, 28.6, 31.3, 20.0]), 1) == "28.6 (6.9-31.3)"
    # A machine twice as slow in the second round: the ratio in each round is still 2.
    assert ratio_per_round([20.0, 10.0], [10.0, 5.0]) == Spread(2.0, 2.0, 2.0, [2.0, 2.0])


@pytest.mark.parametrize(("ratios", "expected"), [
    ([1.4, 1.5, 1.6], "1.500x (1.40-1.60x)"),
    ([0.8, 0.9, 0.85], "0.850x (0.80-0.90x)"),
    ([0.91, 1.2, 1.05], "no measurable difference (0.91-1.20x)"),
    ([1.0, 1.2, 1.1], "no measurable difference (1.00-1.20x)"),  # one round saw no difference at all
])
def test_a_ratio_whose_rounds_fall_on_both_sides_of_one_is_no_measurable_difference(ratios, expected):
    assert format_ratio(Spread.of(ratios)) == expected
