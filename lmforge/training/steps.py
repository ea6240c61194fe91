"""The optimisation loop that pretraining and fine-tuning share.

A :class:`Job` says what differs between them (the batches, the loss, the evaluation, how a
checkpoint is written); :func:`run_steps` does the rest the same way for both: learning-rate
schedule, gradient accumulation, clipping, mixed precision, progress and metrics, periodic
evaluation with early stopping, checkpoints, and the time limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.config import OptimConfig, TrainLoopConfig
from lmforge.errors import TrainingHalted, TrainingInterrupted
from lmforge.runtime import Runtime
from lmforge.testhooks import fake_step_seconds, fault_point
from lmforge.training.budget import StepBudget
from lmforge.training.checkpoint import TrainerState
from lmforge.training.guard import NonfiniteGuard
from lmforge.training.metrics import MetricsLogger, eta_seconds, format_duration, mfu
from lmforge.training.optim import lr_at, set_lr
from lmforge.training.parallel import Parallel, processes
from lmforge.training.signals import GracefulStop

PROGRESS_EVERY_S = 30.0
"""The longest the loop stays silent: between log lines (every ``train.log_interval`` steps) a slow run prints a
progress line this often (steps, tokens/s and ETA: host numbers only, no device sync, no metrics record)."""


def progress_clock() -> Callable[[int], float]:
    """step -> seconds, the clock that times the progress lines: the host's, or under the budget's test hook
    (:func:`lmforge.testhooks.fake_step_seconds`) one on which every step takes exactly that long."""
    fake_s = fake_step_seconds()
    if fake_s is None:
        return lambda step: time.perf_counter()
    return lambda step: step * fake_s


@dataclass
class Job:
    model: torch.nn.Module
    """Owns the trained parameters (gradient clipping)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Iterator[tuple[torch.Tensor, ...]]
    """Micro-batches on the device, in order from the first step to run."""
    loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
    """Micro-batch -> scalar loss (called under autocast)."""
    evaluate: Callable[[bool], dict[str, float]]
    """final? -> val metrics, including ``val_loss`` (the final evaluation may cover more)."""
    save: Callable[[TrainerState], object]
    """Write a checkpoint of the trainer state's step."""
    flops_per_token: float
    peak_flops: float
    synced: torch.nn.Module | None = None
    """The module the loss runs through under torchrun (DDP's wrapper, or the FSDP-sharded model): a step's
    gradient reduction is switched on it; None: ``model``."""
    after_step: Callable[[], None] | None = None
    """Called after every optimizer step (a pruned model's sparsity mask is re-applied there)."""
    on_eval: Callable[[int, dict[str, float]], bool] | None = None
    """Called with (step, metrics) after every evaluation; True stops the run there, as early stopping does
    (a sweep's pruner)."""


@dataclass
class LoopResult:
    step: int
    last_eval: dict[str, float]
    train_time_s: float
    stopped_early: bool
    too_short: str = ""
    """Why a budgeted run was too short for its recipe (:attr:`StepBudget.too_short`), or ""."""


class LoopConfig(Protocol):
    """What the loop reads of its config: TrainConfig and FinetuneConfig both have these sections."""

    train: TrainLoopConfig
    optim: OptimConfig


def format_metrics(metrics: dict) -> str:
    """``loss 1.2345 | ppl 3.4360 | ...`` for the numbers of a metrics dict (``val_`` prefixes dropped)."""
    return " | ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int))


def log_memory(par: Parallel, job: Job, logger: MetricsLogger, say: Callable[..., None], step: int) -> None:
    """What each process holds of the model and optimizer (its shards under FSDP), once, after the first step
    (the optimizer's state exists from then on)."""
    params, optim = par.bytes_per_rank(job.model, job.optimizer)
    logger.log({"step": step, "kind": "memory", "strategy": par.strategy, "world_size": par.where.world_size,
                "param_bytes_per_rank": params, "optimizer_bytes_per_rank": optim})
    say(f"{par.strategy} over {processes(par.where.world_size)}: each holds {params / 2**20:.1f} MiB of parameters and "
        f"{optim / 2**20:.1f} MiB of optimizer state", flush=True)


def l1_penalty(params: list[torch.Tensor], weight: float) -> torch.Tensor:
    """weight * sum(|w|) over ``params``: L1 regularization (``optim.l1``)."""
    return weight * torch.stack([p.abs().sum() for p in params]).sum()


def run_steps(job: Job, cfg: LoopConfig, rt: Runtime, logger: MetricsLogger, state: TrainerState,
              say: Callable[..., None], par: Parallel | None = None) -> LoopResult:
    """Train from ``state.step`` to cfg.train.max_steps (or early stop, or the time limit).

    ``state`` is the trainer state saved with every checkpoint; it is updated in place. A step whose
    loss or gradients are not finite never changes the weights (:class:`NonfiniteGuard`, no device sync
    per step): where the loop syncs anyway (logging, evaluation, checkpoints) ``train.on_nonfinite=halt``
    raises :class:`TrainingHalted` naming the step, ``skip`` logs the dropped steps and halts after
    ``train.max_nonfinite_steps`` such steps in a row.

    Under torchrun (``par``) every rank runs this loop in step: the loss it reports and guards is the
    global batch's, and a time limit or a signal seen by one rank stops all of them at the same step.
    """
    par = par or Parallel(rt.placement)
    synced = job.synced or job.model
    tc = cfg.train
    start_step = step = state.step
    stopped_early = False
    last_eval: dict[str, float] | None = None
    resumed_time = state.train_time_s  # training time before this process started (resume)
    t_start = time.perf_counter() - resumed_time
    t_log, tokens_since_log, log_step = time.perf_counter(), 0, start_step
    clock = progress_clock()
    t_said = clock(start_step)  # when the last log or progress line was printed
    # The loss of the steps kept since the last log line (a resumed run continues its checkpoint's sum).
    loss_sum = torch.tensor(state.log_loss_sum, device=rt.device)
    steps_in_sum = torch.tensor(float(state.log_steps), device=rt.device)
    # fp16's GradScaler skips non-finite steps itself (and lowers its scale).
    guard = None if job.scaler.is_enabled() else NonfiniteGuard(
        job.optimizer, tc.on_nonfinite, tc.max_nonfinite_steps, rt.device, state.nonfinite_in_a_row)
    job.model.train()
    trainable = [p for p in job.model.parameters() if p.requires_grad]  # what clipping looks at
    l1_params = [p for p in trainable if p.dim() >= 2]  # the matrices, as weight decay (optim.param_groups)

    def settle() -> None:
        """Apply the guard's policy to the steps since the last call (one device sync: call it only where
        the loop syncs anyway)."""
        if guard is None:
            return
        try:
            skipped = guard.settle()
        except TrainingHalted:
            logger.close()
            raise
        for s in skipped:
            logger.log({"step": s.step, "kind": "skip", "reason": s.reason})
            say(f"step {s.step}: skipped ({s.reason}; {s.in_a_row} in a row)", flush=True)

    def evaluate(final: bool) -> dict[str, float]:
        fault_point("during_eval")
        if final:
            say(f"step {step}: final evaluation over the whole val split ...", flush=True)
        t0 = time.perf_counter()
        metrics = job.evaluate(final)
        logger.log({"step": step, "kind": "eval", **metrics})
        took = f" ({format_duration(time.perf_counter() - t0)})" if final else ""
        say(f"step {step}: val {format_metrics(metrics)}{took}", flush=True)
        return metrics

    def told_to_stop(metrics: dict[str, float]) -> bool:
        return job.on_eval is not None and bool(job.on_eval(step, metrics))

    if tc.compile:
        say("torch.compile: the first step compiles the model (tens of seconds on a CPU) ...", flush=True)
    if tc.max_minutes is not None:
        say(f"time limit: {tc.max_minutes:g} min of training in this process (train.max_minutes; null for none)")

    def sync() -> None:
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)

    budget = StepBudget(tc, cfg.optim.warmup_steps, state, say, sync, par.broadcast)
    max_steps = budget.max_steps
    with GracefulStop() as stop:
        while step < max_steps:
            lr = lr_at(step, cfg.optim, max_steps, budget.warmup_steps)
            set_lr(job.optimizer, lr)
            step_loss = torch.zeros((), device=rt.device)
            for micro in range(tc.grad_accum):
                if micro:
                    fault_point("mid_accumulation")
                batch = next(job.batches)
                tokens_since_log += batch[0].numel() * rt.world_size  # input slots, padding included
                with par.micro_step(synced, sync=micro == tc.grad_accum - 1):
                    with rt.autocast():
                        loss = job.loss(batch)
                    objective = loss + l1_penalty(l1_params, cfg.optim.l1) if cfg.optim.l1 else loss
                    job.scaler.scale(objective / (tc.grad_accum * par.loss_divisor)).backward()
                step_loss += loss.detach()
            step_loss = par.mean(step_loss)
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                job.scaler.unscale_(job.optimizer)
                grad_norm = par.clip_grad_norm(trainable, cfg.optim.grad_clip)
            fault_point("mid_step")
            if guard is None:
                job.scaler.step(job.optimizer)
                job.scaler.update()
                loss_sum += step_loss
                steps_in_sum += 1
            else:
                if grad_norm is None:  # not clipped: the guard still needs the norm
                    grad_norm = par.total_norm(trainable)
                skipped = guard.step(step + 1, step_loss, grad_norm)
                loss_sum += step_loss.masked_fill(skipped, 0.0)
                steps_in_sum += ~skipped
            job.optimizer.zero_grad(set_to_none=True)
            if job.after_step is not None:
                job.after_step()
            step += 1
            if par.active and step == start_step + 1:
                log_memory(par, job, logger, say, step)
            train_time = time.perf_counter() - t_start
            budget.after_step(step, train_time)
            max_steps = budget.max_steps
            last_step = step == max_steps
            out_of_time = tc.max_minutes is not None and train_time - resumed_time >= tc.max_minutes * 60
            interrupted = stop.requested is not None
            if par.active:  # one rank's clock or signal stops every rank at this step
                out_of_time, interrupted = par.any([out_of_time, interrupted])
            final = last_step or out_of_time or interrupted
            if final or any(step % n == 0 for n in (tc.log_interval, tc.eval_interval, tc.ckpt_interval)):
                settle()  # before anything is logged, evaluated or saved of a step that must halt

            if step % tc.log_interval == 0 or last_step:
                # Reading the numbers syncs with the device: only here, once per log interval.
                numbers = (loss_sum, steps_in_sum) if grad_norm is None else (loss_sum, steps_in_sum, grad_norm.float())
                summed, kept, *norm = torch.stack(numbers).tolist()
                loss_val = summed / (kept * tc.grad_accum) if kept else math.nan
                loss_sum.zero_()
                steps_in_sum.zero_()
                tps = tokens_since_log / (time.perf_counter() - t_log)
                record = {"step": step, "kind": "train", "loss": loss_val, "lr": lr, "tokens_per_s": tps,
                          "mfu": mfu(tps / rt.world_size, job.flops_per_token, job.peak_flops), "time_s": train_time}
                if norm:
                    record["grad_norm"] = norm[0]
                if cfg.optim.l1:
                    with torch.no_grad():
                        record["l1_penalty"] = l1_penalty(l1_params, cfg.optim.l1).item()
                logger.log(record)
                # ETA at the pace of the last log interval: the first steps (compilation, warm-up) and an
                # earlier load on the machine stop counting once they are past.
                eta = eta_seconds(time.perf_counter() - t_log, step - log_step, max_steps - step)
                say(f"step {step}/{max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"MFU {record['mfu']:.1%} | ETA {format_duration(eta)}", flush=True)
                t_log, tokens_since_log, log_step = time.perf_counter(), 0, step
                t_said = clock(step)
            elif clock(step) - t_said >= PROGRESS_EVERY_S:
                # A slow run between log lines: show it is alive, from host numbers only (the loss would sync).
                tps = tokens_since_log / (time.perf_counter() - t_log)
                eta = eta_seconds(time.perf_counter() - t_log, step - log_step, max_steps - step)
                say(f"step {step}/{max_steps} | {tps:,.0f} tok/s | ETA {format_duration(eta)} | "
                    f"loss every {tc.log_interval} steps (train.log_interval)", flush=True)
                t_said = clock(step)

            # An interrupted run still makes the evaluation due at this step (its resume will not), but not
            # the final one over the whole split.
            if step % tc.eval_interval == 0 or (final and not interrupted):
                last_eval = evaluate(final and not interrupted)
                if last_eval["val_loss"] < state.best_val_loss:
                    state.best_val_loss, state.evals_without_improvement = last_eval["val_loss"], 0
                else:
                    state.evals_without_improvement += 1
                    if tc.patience is not None and state.evals_without_improvement >= tc.patience:
                        say(f"early stop: no val improvement in {tc.patience} evaluations")
                        stopped_early = final = True
                if told_to_stop(last_eval) and not final:  # asked at every evaluation, the final one too
                    say(f"step {step}: stopped by the caller (a sweep's pruner)")
                    stopped_early = final = True
            if step % tc.ckpt_interval == 0 or final:
                state.step, state.train_time_s = step, time.perf_counter() - t_start
                state.log_loss_sum, log_steps = torch.stack((loss_sum, steps_in_sum)).tolist()
                state.log_steps = int(log_steps)
                state.nonfinite_in_a_row = guard.in_a_row if guard is not None else 0
                job.save(state)  # every rank: under FSDP the weights are gathered from all
            if interrupted:
                logger.close()
                by = stop.requested or "a signal to another process"
                raise TrainingInterrupted(f"stopped at step {step} by {by}, with a checkpoint of it")
            if final:
                if out_of_time and not last_step:
                    say(f"time limit of {tc.max_minutes:g} min reached at step {step} (train.max_minutes; "
                        f"--resume continues for as long again)")
                break
    if last_eval is None:  # resumed a run that had already finished
        last_eval = evaluate(True)
    train_time = time.perf_counter() - t_start
    logger.log({"step": step, "kind": "done", "time_s": train_time})  # the time the done: line prints
    logger.close()
    return LoopResult(step, last_eval, train_time, stopped_early, budget.too_short)
