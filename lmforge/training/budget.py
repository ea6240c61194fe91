"""``train.budget_minutes``: train for a given time with the learning-rate schedule completed.

A step count cannot be chosen in advance for a time: the same model steps 3x faster on one CPU than on
another, and a VM's speed drifts by ±15% within minutes. So the count is planned from the pace
measured in the run itself: first after :data:`PLAN_AFTER` steps (timed from the end of the first
step, which compiles and warms up), then revised at every log line from the pace of all steps so far,
until the run is :data:`REVISE_UNTIL` of the way through its plan. A revision moves the end of the
schedule (a cosine's lr shifts by a few percent at most; WSD's stable phase just gets longer or
shorter); after that the plan is fixed, so the decay runs to its end undisturbed. The plan is saved
with each checkpoint (:attr:`TrainerState.planned_steps`) and a resume keeps it.

A machine can be too slow for a recipe: at 6 s/step a 3-minute budget holds 28 steps, fewer than the
default recipe's 50 warmup steps. The plan then still ends the schedule with the budget: the warmup is
cut to a :data:`MEANINGFUL_WARMUPS`-th of the plan (:meth:`StepBudget.warmup_steps`), and the plan and
the done line say plainly that the run is too short for the recipe, and what to do about it.

A test may make the plan read a fake clock instead (:func:`lmforge.testhooks.fake_step_seconds`: training time
at step n is n * S), so that it knows the planned step count on any host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from lmforge.config import TrainLoopConfig
from lmforge.testhooks import fake_step_seconds
from lmforge.training.checkpoint import TrainerState

PLAN_AFTER = 10
"""Steps timed, after the first, before the first plan."""
REVISE_UNTIL = 0.5
"""The plan is revised until the run is this far through it, then fixed."""
MEANINGFUL_WARMUPS = 3
"""A budgeted run shorter than this many of its recipe's warmups is too short for the recipe: its warmup is cut
to fit, and it is said to be too short. (The default recipe's 3 minutes on a 2-core Zen 4 EPYC (AVX512-BF16) plan
190-270 steps, 3.8-5.4 of its 50-step warmups, as the VM's pace drifts between 0.66 and 0.93 s/step, measured; those
runs are the reference quality and must not warn. Below 3 the warmup alone would be over a third of the run.)"""
EVAL_BATCH_COST = 1 / 3
"""An evaluation batch's cost relative to a training micro-batch (a forward pass without the backward)."""


def plan_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, tc: TrainLoopConfig) -> int:
    """The step count that fills ``budget_s`` seconds of training: ``elapsed_s`` are spent at ``step``,
    and each further step takes ``step_s`` plus its share of the periodic evaluations. At least one more
    step, at most train.max_steps."""
    fits = int((budget_s - elapsed_s) / step_cost(step_s, tc))
    return max(step + 1, min(tc.max_steps, step + fits))


def step_cost(step_s: float, tc: TrainLoopConfig) -> float:
    """Seconds per step with its share of the periodic evaluations, for steps of ``step_s`` seconds."""
    return step_s * (1 + tc.eval_batches * EVAL_BATCH_COST / (tc.grad_accum * tc.eval_interval))


def too_short(planned_steps: int, warmup_steps: int) -> str:
    """Why a run that planned ``planned_steps`` (0: no plan) is too short for a recipe warming up over
    ``warmup_steps``, or "" when it is not (:data:`MEANINGFUL_WARMUPS`)."""
    if not planned_steps or planned_steps >= MEANINGFUL_WARMUPS * warmup_steps:
        return ""
    return (f"too short for this recipe: {planned_steps} steps, under {MEANINGFUL_WARMUPS}x its {warmup_steps}-step "
            f"warmup (see the plan's warning)")


class StepBudget:
    """The step count of a budgeted run, planned and revised as described in the module docstring."""

    def __init__(self, tc: TrainLoopConfig, warmup_steps: int, state: TrainerState, say: Callable[..., None],
                 sync: Callable[[], None], agree: Callable[[int], int] = lambda n: n):
        """``warmup_steps`` is the recipe's (optim.warmup_steps); ``agree`` makes one plan of every process's
        (under torchrun: rank 0's, broadcast)."""
        self.tc, self.state, self.say, self.sync, self.agree = tc, state, say, sync, agree
        self.tc_warmup = warmup_steps
        self.warned = False
        self.active = bool(tc.budget_minutes)
        self.start_step = state.step
        self.t_paced = 0.0
        self.fake_step_s = fake_step_seconds()
        if self.active and not state.planned_steps:
            say(f"time budget: {tc.budget_minutes:g} min of training (train.budget_minutes): the step count is planned "
                f"from the pace of the first steps, so that the learning-rate schedule ends with the budget")

    @property
    def warmup_steps(self) -> int:
        """The warmup the schedule uses: the recipe's, or under a plan too short for it (see
        :data:`MEANINGFUL_WARMUPS`) a fraction of the plan, so that warmup and decay both end inside it."""
        warmup = self.tc_warmup
        if self.active and self.state.planned_steps:
            warmup = min(warmup, self.state.planned_steps // MEANINGFUL_WARMUPS)
        return warmup

    @property
    def too_short(self) -> str:
        """For the done line: why the run is too short for its recipe, or "" when it is not."""
        return too_short(self.state.planned_steps if self.active else 0, self.tc_warmup)

    @property
    def max_steps(self) -> int:
        """The steps to train: the plan once it is made, else train.max_steps."""
        return self.state.planned_steps if self.active and self.state.planned_steps else self.tc.max_steps

    def _clock(self, step: int) -> float:
        """Seconds on the clock the plan reads, at ``step``."""
        return step * self.fake_step_s if self.fake_step_s is not None else time.perf_counter()

    def _frozen(self, step: int) -> bool:
        return bool(self.state.planned_steps) and step >= REVISE_UNTIL * self.state.planned_steps

    def after_step(self, step: int, train_time_s: float) -> None:
        """Plan or revise at ``step`` (training time so far ``train_time_s``) where it is due."""
        if not self.active or self._frozen(step):
            return
        if self.fake_step_s is not None:
            train_time_s = self._clock(step)
        paced = step - (self.start_step + 1)
        first = not self.state.planned_steps and paced == PLAN_AFTER
        if paced == 0:
            self.sync()  # the pace of queued GPU work is known only once it is done
            self.t_paced = self._clock(step)
            return
        if not (first or (self.state.planned_steps and paced >= PLAN_AFTER and step % self.tc.log_interval == 0)):
            return
        self.sync()
        step_s = (self._clock(step) - self.t_paced) / paced
        old = self.state.planned_steps
        new = self.state.planned_steps = self.agree(plan_steps(self.tc.budget_minutes * 60, train_time_s, step,
                                                               step_s, self.tc))
        capped = " (capped by train.max_steps)" if new == self.tc.max_steps else ""
        if first:
            self.say(f"step {step}: {step_s:.3f} s/step, so {new} steps fill the {self.tc.budget_minutes:g} min "
                     f"budget{capped}; the learning-rate schedule ends there", flush=True)
        elif abs(new - old) > 0.02 * old:
            self.say(f"step {step}: {step_s:.3f} s/step so far: {new} steps now fill the budget{capped} "
                     f"(planned {old})", flush=True)
        if too_short(new, self.tc_warmup) and not self.warned:  # once: a revision may cross back and forth
            self.warned = True
            wanted = 10 * self.tc_warmup
            minutes = math.ceil((train_time_s + (wanted - step) * step_cost(step_s, self.tc)) / 60)
            self.say(f"warning: {new} steps are too few for this recipe, under {MEANINGFUL_WARMUPS}x its "
                     f"{self.tc_warmup}-step warmup (optim.warmup_steps), so the model will be poor. The warmup is "
                     f"cut to {self.warmup_steps} steps so that the schedule still ends with the budget. For a "
                     f"meaningful run: a longer budget (train.budget_minutes={minutes} makes ~{wanted} steps at "
                     f"this pace), a smaller model, or a quieter machine", flush=True)
