"""Watching stop strings in a growing text: the linear matcher agrees with the definition at every step."""

from __future__ import annotations

import random

from lmforge.generate import partial_stop
from lmforge.serve.text import StopPrefixes


def test_the_held_back_end_is_the_longest_that_could_still_become_a_stop_string():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 7))) for _ in range(rng.randint(0, 3))]
        prefixes, text = StopPrefixes(stops), ""
        for _ in range(30):
            if rng.random() < 0.1 and text:  # a decoder that rewrites earlier text: the matcher starts again
                text = text[:-rng.randint(1, len(text))] + "b"
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
            assert prefixes.held(text) == partial_stop(text, stops), (stops, text)  # the definition, quadratic
