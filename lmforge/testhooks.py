"""Test instruments, inert unless their environment variable is set: fault injection (die at a named point
exactly as ``kill -9`` would), a trace of the training samples drawn, and a fake clock for the step budget.

``LMFORGE_FAULT=POINT:N`` makes the process SIGKILL itself the N-th time (from 1) it reaches
``fault_point("POINT")``; unset, every fault point is a dictionary lookup and nothing else. The
points (see :data:`POINTS`) sit where a crash could lose or corrupt something: inside a step, inside
an evaluation, between the files of a checkpoint, after its rename but before ``latest`` moves,
while old checkpoints are rotated away.
Tests kill a run at each point, resume it, and compare every step's loss with an uninterrupted run.

``LMFORGE_TRACE_BATCHES=FILE`` appends one JSON line per training micro-batch drawn (step, global
micro-batch j, window starts) to FILE, from every process: a test compares the samples of runs on
different numbers of processes, interrupted or not.

``LMFORGE_FAKE_STEP_SECONDS=S`` makes ``train.budget_minutes`` plan on a clock on which every step takes
exactly S seconds (:func:`fake_step_seconds`), so that a test knows the planned step count on any host, fast
or slow, quiet or loaded.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence

POINTS = ("mid_accumulation", "mid_step", "during_eval", "after_weights_file", "after_trainer_tensors",
          "after_trainer_state", "after_manifest", "before_latest", "during_rotation", "mid_prepare")
"""The fault points: in a training step (between micro-batches, after the backward before the optimizer
step), in an evaluation, in the order a checkpoint write and its rotation reach them, and in the
middle of ``prepare`` (the tokenizer written, the shards not yet)."""

_reached: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("LMFORGE_FAULT")
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit():
        raise ValueError(f"LMFORGE_FAULT={spec!r}: expected POINT:N with POINT one of {', '.join(POINTS)}")
    return point, int(count)


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``LMFORGE_FAULT`` arms ``name`` and this is its N-th visit."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def trace_batch(step: int, j: int, offsets: Sequence[int]) -> None:
    """Record micro-batch ``j`` of ``step`` if ``LMFORGE_TRACE_BATCHES`` names a file (see the module docstring)."""
    path = os.environ.get("LMFORGE_TRACE_BATCHES")
    if not path:
        return
    line = json.dumps({"step": step, "j": j, "offsets": [int(o) for o in offsets]}) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # one write per line: appends from several processes stay whole
        f.write(line)


FAKE_STEP_SECONDS = "LMFORGE_FAKE_STEP_SECONDS"


def fake_step_seconds() -> float | None:
    """The seconds every step takes on the budget's fake clock, or None (unset: the real clock)."""
    spec = os.environ.get(FAKE_STEP_SECONDS)
    if not spec:
        return None
    try:
        seconds = float(spec)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{FAKE_STEP_SECONDS}={spec!r}: expected a number of seconds > 0")
    return seconds
