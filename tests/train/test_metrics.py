"""The arithmetic behind what a run reports."""

import math

import pytest

from lmforge.train.metrics import bits_per_byte, perplexity


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=100, n_bytes=400) == pytest.approx(0.25)


def test_perplexity_is_exp_of_the_loss_and_stays_finite_for_a_diverged_run():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e9))
