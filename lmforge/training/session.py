"""What every training command sets up the same way: the runtime, the run directory (new, or the one
to resume), the trainer state restored from a checkpoint, the peak FLOP/s that MFU divides by, and
the metrics logger.

``train()`` (:mod:`lmforge.training.loop`) and ``finetune()`` (:mod:`lmforge.finetuning.loop`) open a
:class:`TrainingSession`, build what differs between them (data, model, task) and hand a
:class:`~lmforge.training.steps.Job` to the shared loop through :meth:`TrainingSession.run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from safetensors.torch import save_file

from lmforge import rundir
from lmforge.config import ModelConfig, ParallelConfig, changed_keys, save_yaml, to_dict, to_yaml
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.hardware import peak_flops
from lmforge.runtime import Runtime, setup_runtime
from lmforge.training.checkpoint import (
    TrainerState,
    load_trainer_state,
    read_full_weights,
    read_trainer_state,
    save_checkpoint,
    set_rng_state,
    trainer_meta,
)
from lmforge.training.metrics import MetricsLogger
from lmforge.training.parallel import Parallel, processes, resolve_grad_accum
from lmforge.training.precision import PrecisionChoice, choose_precision
from lmforge.training.steps import Job, LoopConfig, LoopResult, run_steps


class RunConfig(LoopConfig, Protocol):
    """A training command's config: the loop's sections, the parallel settings and the run directory."""

    out_dir: str
    parallel: ParallelConfig


def _quiet(*_args, **_kwargs) -> None:
    pass


@dataclass
class TrainingSession:
    cfg: RunConfig
    rt: Runtime
    run_dir: Path
    resume_from: Path | None
    """The checkpoint to resume from; None for a new run."""
    say: Callable[..., None]
    """print on the main process when progress is shown, else nothing."""
    parallel: Parallel
    """The processes this run trains on (torchrun's; one plain process without it)."""
    precision_reason: str = ""
    """Why the runtime trains in its precision (see :meth:`choose_precision`), for the run header."""

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool, progress: bool) -> TrainingSession:
        """Pick the runtime, the processes and the run directory: cfg.out_dir to resume, else a fresh one
        (cfg.out_dir is set to it; chosen by rank 0)."""
        tc = cfg.train
        rt = setup_runtime(tc.device, tc.precision, tc.threads)
        par = Parallel.start(rt, cfg.parallel.strategy)
        asked = Path(cfg.out_dir)
        run_dir, ckpt = par.on_rank0(lambda: rundir.open_run_dir(asked, resume))
        cfg.out_dir = str(run_dir)
        session = cls(cfg, rt, run_dir, ckpt, print if rt.is_main and progress else _quiet, par)
        tc.grad_accum = resolve_grad_accum(tc.batch_size, tc.grad_accum, tc.global_batch_size, rt.world_size)
        session.check_global_batch()
        if run_dir != asked:  # never overwrite: say where this run goes instead, and how to continue that one
            session.say(f"{asked} already holds a run, so this one is {run_dir} (out_dir=DIR picks another; "
                        f"--resume {asked} continues that run)")
        return session

    def create_run_dir(self, kind: rundir.Kind, task: rundir.Task, lora: bool,
                       write_files: Callable[[Path], None]) -> None:
        """For a new run, on the main process: config.yaml, the command's own files, then run.json. A
        resumed run whose config was changed by overrides (a larger train.max_steps) gets config.yaml
        rewritten, so that it says what is trained from now on."""
        if not self.rt.is_main:
            return
        if self.resume_from is not None:
            path = self.run_dir / rundir.CONFIG
            changes = changed_keys(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, to_dict(self.cfg))
            if changes:
                rundir.write_text_atomic(path, to_yaml(self.cfg))
                self.say(f"{path} updated for this resume: "
                         + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes))
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(self.cfg, self.run_dir / rundir.CONFIG)
        write_files(self.run_dir)
        rundir.write_run_info(self.run_dir, kind, task, lora)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes."""
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.rt.world_size

    def describe_batch(self, tokens_per_sequence: int | None = None) -> str:
        """``batch 16 x 2 micro-batches x 2 processes = 64 sequences (16,384 tokens)``, for the run header."""
        tc, world = self.cfg.train, self.rt.world_size
        parts = [f"batch {tc.batch_size}"] + ([f"{tc.grad_accum} micro-batches"] if tc.grad_accum > 1 else []) \
            + ([f"{processes(world)} ({self.parallel.strategy})"] if self.parallel.active else [])
        total = f" = {self.global_batch} sequences" if len(parts) > 1 else ""
        tokens = f" ({self.global_batch * tokens_per_sequence:,} tokens)" if tokens_per_sequence else ""
        return " x ".join(parts) + total + tokens + " per step"

    def check_global_batch(self) -> None:
        """UserError if a resume would train with another global batch than its checkpoint (another number of
        processes without train.global_batch_size, or another batch size): its steps would not be the run's."""
        if self.resume_from is None:
            return
        ckpt = self.resume_from
        if not (ckpt / rundir.TRAINER_STATE).is_file():  # weights only: nothing trained with any batch yet
            return
        saved = self.parallel.on_rank0(lambda: trainer_meta(ckpt).get("global_batch", 0))
        now, tc, world = self.global_batch, self.cfg.train, self.rt.world_size
        if not saved or saved == now:
            return
        per_accum = tc.batch_size * world
        fit = f"train.grad_accum={saved // per_accum} keeps it with {processes(world)}, or " \
            if saved % per_accum == 0 else ""
        raise UserError(f"cannot resume {self.run_dir}: it trained with a global batch of {saved} sequences per step, "
                        f"this resume would use {now} (train.batch_size {tc.batch_size} x train.grad_accum "
                        f"{tc.grad_accum} x {processes(world)}); {fit}"
                        f"train.global_batch_size={saved} keeps it on any number of processes")

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                load_weights: Callable[[Path], None]) -> TrainerState:
        """The trainer state to start from: a fresh one, or the checkpoint's (weights, optimizer, RNG). Under
        torchrun, rank 0 reads the checkpoint and every other rank receives it."""
        par = self.parallel
        if self.resume_from is None:
            state = TrainerState()
        elif not (self.resume_from / rundir.TRAINER_STATE).is_file():
            state = self._start_from_weights(model, load_weights)
        elif not par.active:
            load_weights(self.resume_from)
            state = load_trainer_state(self.resume_from, optimizer)
        else:
            state = self._restore_distributed(model, optimizer, load_weights)
        if self.resume_from is not None:
            self.say(f"resuming from {self.resume_from} (step {state.step})")
        state.global_batch = self.global_batch
        if self.rt.rank > 0:  # dropout masks of their own on the other ranks (rank 0 has the checkpoint's RNG)
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.rt.rank + state.step)
        return state

    def _start_from_weights(self, model: torch.nn.Module, load_weights: Callable[[Path], None]) -> TrainerState:
        """A checkpoint of weights and no trainer state (an imported or compressed model): training starts from
        them, at step 0 with a fresh optimizer (read by rank 0, broadcast to the others)."""
        par, ckpt, read = self.parallel, self.resume_from, {}

        def read_on_rank0() -> None:
            if par.sharded:
                read["weights"] = read_full_weights(ckpt, par.full_shapes(model))
            else:
                load_weights(ckpt)

        par.on_rank0(read_on_rank0)
        if par.sharded:
            par.load_full_model_state(model, read.get("weights", {}))
        else:
            par.broadcast_module(model)
        return TrainerState()

    def _restore_distributed(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             load_weights: Callable[[Path], None]) -> TrainerState:
        par, ckpt = self.parallel, self.resume_from
        read: dict = {}

        def read_on_rank0() -> TrainerState:
            if par.sharded:
                read["weights"] = read_full_weights(ckpt, par.full_shapes(model))
            else:
                load_weights(ckpt)
            state, read["optimizer"], rng = read_trainer_state(ckpt)
            set_rng_state(rng)
            return state

        state = par.on_rank0(read_on_rank0)
        if par.sharded:
            par.load_full_model_state(model, read.get("weights", {}))
            par.load_full_optimizer_state(model, optimizer, read.get("optimizer", {}))
        else:
            par.broadcast_module(model)
            if self.rt.is_main:
                optimizer.load_state_dict(read["optimizer"])
            par.broadcast_optimizer(optimizer)
        return state

    def save(self, state: TrainerState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             write_weights: Callable[[Path], None] | None = None) -> None:
        """Checkpoint ``state.step``, written by rank 0. Every rank calls it: under FSDP the full weights and
        optimizer state are gathered from all of them first (same files as one process writes)."""
        optimizer_state = None
        if self.parallel.sharded:
            weights = self.parallel.full_model_state(model)
            optimizer_state = self.parallel.full_optimizer_state(model, optimizer)
            def write_weights(folder: Path) -> None:  # noqa: E306 - the gathered weights, not the shards
                save_file(weights, str(folder / rundir.WEIGHTS))
        if self.rt.is_main:
            save_checkpoint(self.run_dir, model, optimizer, state, self.cfg.train.keep_last, write_weights,
                            optimizer_state)

    def choose_precision(self, model_cfg: ModelConfig) -> None:
        """Settle the training precision for this model: train.precision, or for 'auto' the faster one as
        measured on this machine (:mod:`lmforge.training.precision`); under torchrun measured by rank 0."""
        choice: PrecisionChoice = self.parallel.on_rank0(
            lambda: choose_precision(self.cfg.train.precision, model_cfg, self.rt.device))
        self.rt.precision, self.precision_reason = choice.precision, choice.reason

    def describe_device(self) -> str:
        """``cpu fp32 (auto: bf16 measured 0.01x fp32 here)``: the header's device and precision."""
        reason = f" ({self.precision_reason})" if self.precision_reason else ""
        return f"{self.rt.device} {self.rt.precision}{reason}"

    def peak_flops(self) -> tuple[float, str]:
        """Peak FLOP/s of this device in the training precision, and where the figure came from (measured by rank 0
        under torchrun)."""
        return self.parallel.on_rank0(lambda: peak_flops(self.rt.device, self.rt.autocast_dtype or torch.float32))

    def logger(self, start_step: int) -> MetricsLogger:
        return MetricsLogger(self.run_dir, self.rt.is_main, start_step, config=to_dict(self.cfg))

    def say_done(self, summary: str, next_commands: list[str]) -> None:
        """The closing lines: the summary, where the checkpoint and the loss curve are, what to run next."""
        self.say(f"done: {summary}")
        self.say(f"  checkpoint {rundir.latest_checkpoint(self.run_dir)} | loss curve {self.run_dir / 'loss.png'}")
        self.say("  next: " + "  |  ".join(next_commands))

    def run(self, job: Job, state: TrainerState, logger: MetricsLogger) -> LoopResult:
        """The shared optimisation loop, from state.step to the end (see :func:`run_steps`)."""
        try:
            return run_steps(job, self.cfg, self.rt, logger, state, self.say, self.parallel)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}; continue with --resume {self.run_dir}") from None
