"""What every training command does the same way, in the same order.

``train()`` (:mod:`lmforge.training.pretrain`) and ``finetune()`` (:mod:`lmforge.finetuning.finetune`) both:

1. :meth:`TrainingSession.open`: start the processes, pick the run directory (new, or the one to resume) and take
   its writer's lock (:func:`lmforge.rundir.lock`), held until the command returns;
2. :meth:`TrainingSession.make_plan`: turn (config, data, host) into a frozen :class:`RunPlan`: a copy of the
   config with every derived value filled in (the config they were given is never modified), the micro-batches
   per step, and the precision, decided once;
3. build what differs between them (data, model, task) as a :class:`Trainee`;
4. :meth:`TrainingSession.train`: write the run directory, wrap the model for the processes, build the
   optimizer, restore the checkpoint, compile, print the header and run the shared loop (:mod:`.steps`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from safetensors.torch import save_file

from lmforge import rundir
from lmforge.config import ModelConfig, ParallelConfig, TrainLoopConfig, changed_keys, save_yaml, to_dict, to_yaml
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.hardware import peak_flops
from lmforge.runtime import Runtime, maybe_compile, place
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
from lmforge.training.optim import build_optimizer
from lmforge.training.parallel import Parallel, processes, resolve_grad_accum
from lmforge.training.precision import PrecisionChoice, choose_precision
from lmforge.training.steps import Job, LoopConfig, LoopResult, run_steps


class RunConfig(LoopConfig, Protocol):
    """A training command's config: the loop's sections, the parallel settings and the run directory."""

    out_dir: str
    parallel: ParallelConfig
    model: ModelConfig


def _quiet(*_args, **_kwargs) -> None:
    pass


@dataclass(frozen=True)
class RunPlan:
    """What a run decided before it trains, from (config, data, host); nothing changes it afterwards."""

    config: RunConfig
    """The user's config with what the run derived filled in: the run directory, the dataset and vocabulary
    (train) or the base and its model (finetune), the micro-batches per step. A copy: the config a command was
    given is never modified. It is what the run's config.yaml holds."""
    run_dir: Path
    resume_from: Path | None
    """The checkpoint to resume from; None for a new run."""
    rt: Runtime
    """Device, rank and world size, and the precision decided for this model on this host."""
    precision_reason: str
    """Why the run trains in its precision (:func:`choose_precision`), for the run header."""

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes."""
        tc = self.config.train
        return tc.batch_size * tc.grad_accum * self.rt.world_size


@dataclass
class Trainee:
    """What a training command trains, and how: everything that differs between ``train`` and ``finetune``."""

    model: torch.nn.Module
    """The model to train (LoRA adapters applied), on the run's device."""
    kind: rundir.Kind
    task: rundir.Task
    lora: bool
    describe: str
    """The run header's words for the model, e.g. ``model 4.20M params, 25.2 MFLOPs/token``."""
    flops_per_token: float
    write_files: Callable[[Path], None]
    """Write what a new run directory holds beyond config.yaml and run.json (tokenizer, labels, ...)."""
    load_state: Callable[[Path], None]
    """Load a checkpoint's weights (or adapters) into ``model``."""
    batches: Callable[[int], Iterator[tuple[torch.Tensor, ...]]]
    """Micro-batches on the device, in order from the given step."""
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    """(the module steps run through, micro-batch) -> scalar loss."""
    evaluate: Callable[[torch.nn.Module, bool], dict[str, float]]
    """(the module evaluations run through, final?) -> val metrics with ``val_loss``."""
    tokens_per_sequence: int | None = None
    """For the header's batch line (pretraining: the context)."""
    write_weights: Callable[[Path], None] | None = None
    """Write a checkpoint's weights into a folder (LoRA: the adapters only); None: the model's."""
    after_step: Callable[[], None] | None = None
    """Called after every optimizer step (a pruned model's sparsity mask is re-applied there)."""
    before_training: Callable[[torch.nn.Module, MetricsLogger], None] | None = None
    """Called once with the evaluation module before a new run's first step (a base model's scores)."""
    on_eval: Callable[[int, dict[str, float]], bool] | None = None
    """After every evaluation; True stops the run there (a sweep's pruner)."""


@dataclass
class TrainingSession:
    """A training command's processes, run directory and plan; :meth:`train` is the part every command shares."""

    parallel: Parallel
    """The processes this run trains on (torchrun's; one plain process without it)."""
    run_dir: Path
    resume_from: Path | None
    say: Callable[..., None]
    """print on the main process when progress is shown, else nothing."""
    plan: RunPlan | None = None
    """Set once by :meth:`make_plan`."""
    lock: rundir.RunLock | None = None
    """The run directory's writer's lock, held by rank 0 (the one process that writes it) until :meth:`close`."""

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool, progress: bool) -> TrainingSession:
        """Start the processes, pick the run directory (cfg.out_dir to resume, else a fresh one; never an existing
        run's) and lock it, on rank 0: used as a context manager, the session releases the lock on leaving."""
        tc = cfg.train
        where = place(tc.device, tc.threads)
        par = Parallel.start(where, cfg.parallel.strategy)
        asked, held = Path(cfg.out_dir), []

        def choose() -> tuple[Path, Path | None]:
            run_dir, ckpt, run_lock = rundir.open_run_dir(asked, resume)
            held.append(run_lock)  # stays in this process; the others get the directory's name
            return run_dir, ckpt

        run_dir, ckpt = par.on_rank0(choose)
        say = print if where.is_main and progress else _quiet
        session = cls(par, run_dir, ckpt, say, lock=held[0] if held else None)
        if run_dir != asked:  # never overwrite: say where this run goes instead, and how to continue that one
            session.say(f"{asked} already holds a run, so this one is {run_dir} (out_dir=DIR picks another; "
                        f"--resume {asked} continues that run)")
        return session

    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory's lock (the process's end releases it too, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    def make_plan(self, cfg: RunConfig, derived: Callable[[RunConfig], None]) -> RunPlan:
        """The run's plan (see :class:`RunPlan`): a copy of ``cfg`` with the run directory and the micro-batches per
        step filled in, then the command's ``derived`` values (its data's vocabulary, its base's model), then the
        precision for that model, decided once: train.precision; for 'auto', the precision a resumed run trained
        in, else measured on this machine by rank 0 (:mod:`lmforge.training.precision`)."""
        config = copy.deepcopy(cfg)
        config.out_dir = str(self.run_dir)
        tc, where = config.train, self.parallel.where
        tc.grad_accum = resolve_grad_accum(tc.batch_size, tc.grad_accum, tc.global_batch_size, where.world_size)
        self.check_global_batch(tc)
        self.check_max_steps(tc)
        derived(config)
        choice: PrecisionChoice = self.parallel.on_rank0(
            lambda: choose_precision(tc.precision, config.model, where.device, self._trained_in()))
        rt = Runtime(where.device, choice.precision, where.rank, where.world_size)
        self.plan = RunPlan(config, self.run_dir, self.resume_from, rt, choice.reason)
        return self.plan

    def _trained_in(self) -> str:
        """The precision the checkpoint to resume from was trained in ('' for a new run, or not recorded)."""
        ckpt = self.resume_from
        if ckpt is None or not (ckpt / rundir.TRAINER_STATE).is_file():
            return ""
        return trainer_meta(ckpt).get("precision", "")

    def check_global_batch(self, tc: TrainLoopConfig) -> None:
        """UserError if a resume would train with another global batch than its checkpoint (another number of
        processes without train.global_batch_size, or another batch size): its steps would not be the run's."""
        ckpt = self.resume_from
        if ckpt is None or not (ckpt / rundir.TRAINER_STATE).is_file():  # weights only: no batch trained yet
            return
        saved = self.parallel.on_rank0(lambda: trainer_meta(ckpt).get("global_batch", 0))
        world = self.parallel.where.world_size
        now = tc.batch_size * tc.grad_accum * world
        if not saved or saved == now:
            return
        per_accum = tc.batch_size * world
        fit = f"train.grad_accum={saved // per_accum} keeps it with {processes(world)}, or " \
            if saved % per_accum == 0 else ""
        raise UserError(f"cannot resume {self.run_dir}: it trained with a global batch of {saved} sequences per step, "
                        f"this resume would use {now} (train.batch_size {tc.batch_size} x train.grad_accum "
                        f"{tc.grad_accum} x {processes(world)}); {fit}"
                        f"train.global_batch_size={saved} keeps it on any number of processes")

    def check_max_steps(self, tc: TrainLoopConfig) -> None:
        """UserError if a resume sets train.max_steps below the step its checkpoint reached (it would train nothing
        and rewrite the run's config)."""
        ckpt = self.resume_from
        if ckpt is None or not (ckpt / rundir.TRAINER_STATE).is_file():
            return
        step = self.parallel.on_rank0(lambda: trainer_meta(ckpt).get("step", 0))
        if tc.max_steps < step:
            raise UserError(f"cannot resume {self.run_dir}: train.max_steps={tc.max_steps} is below the step it "
                            f"reached ({step}); nothing was changed (train.max_steps={step} or more continues it)")

    # --- the part every training command shares, in this order --------------------------------------------

    def train(self, trainee: Trainee) -> LoopResult:
        """Train ``trainee`` per the plan: check the strategy, write the run directory, wrap the model for the
        processes, build the optimizer, restore the checkpoint, compile, print the header, run the loop."""
        plan, par, model = self.plan, self.parallel, trainee.model
        cfg, rt = plan.config, plan.rt
        par.check(model, lora=trainee.lora)
        self._write_run_dir(trainee)
        synced = par.wrap(model, rt.precision)
        optimizer = build_optimizer(model, cfg.optim, rt.device, rt.precision)
        state = self._restore(model, optimizer, trainee.load_state)
        step_model = maybe_compile(synced, cfg.train.compile)
        # Evaluation runs on the model itself, the same on every rank: under DDP without its wrapper (no
        # collectives, nothing to sync).
        eval_model = step_model if synced is model else maybe_compile(model, cfg.train.compile)
        peak, peak_source = par.on_rank0(lambda: peak_flops(rt.device, rt.autocast_dtype or torch.float32))
        reason = f" ({plan.precision_reason})" if plan.precision_reason else ""
        self.say(f"run {self.run_dir} | {trainee.describe} | {rt.device} {rt.precision}{reason} | "
                 f"{self.describe_batch(trainee.tokens_per_sequence)} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
        logger = MetricsLogger(self.run_dir, rt.is_main, state.step, config=to_dict(cfg))
        if self.resume_from is None and trainee.before_training is not None:
            trainee.before_training(eval_model, logger)

        def save(st: TrainerState) -> None:
            self._save(st, model, optimizer, trainee.write_weights)

        job = Job(model=model, optimizer=optimizer, scaler=rt.grad_scaler(), batches=trainee.batches(state.step),
                  loss=lambda batch: trainee.loss(step_model, batch), evaluate=lambda final: trainee.evaluate(
                      eval_model, final), save=save, flops_per_token=trainee.flops_per_token, peak_flops=peak,
                  synced=synced, after_step=trainee.after_step, on_eval=trainee.on_eval)
        try:
            return run_steps(job, cfg, rt, logger, state, self.say, par)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}; continue with --resume {self.run_dir}") from None

    def _write_run_dir(self, trainee: Trainee) -> None:
        """For a new run, on the main process: config.yaml, the command's own files, then run.json. A
        resumed run whose config was changed by overrides (a larger train.max_steps) gets config.yaml
        rewritten, so that it says what is trained from now on."""
        if not self.plan.rt.is_main:
            return
        cfg = self.plan.config
        if self.resume_from is not None:
            path = self.run_dir / rundir.CONFIG
            changes = changed_keys(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, to_dict(cfg))
            if changes:
                rundir.write_text_atomic(path, to_yaml(cfg))
                self.say(f"{path} updated for this resume: "
                         + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes))
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / rundir.CONFIG)
        trainee.write_files(self.run_dir)
        rundir.write_run_info(self.run_dir, trainee.kind, trainee.task, trainee.lora)

    def describe_batch(self, tokens_per_sequence: int | None = None) -> str:
        """``batch 16 x 2 micro-batches x 2 processes = 64 sequences (16,384 tokens)``, for the run header."""
        plan = self.plan
        tc, world = plan.config.train, plan.rt.world_size
        parts = [f"batch {tc.batch_size}"] + ([f"{tc.grad_accum} micro-batches"] if tc.grad_accum > 1 else []) \
            + ([f"{processes(world)} ({self.parallel.strategy})"] if self.parallel.active else [])
        total = f" = {plan.global_batch} sequences" if len(parts) > 1 else ""
        tokens = f" ({plan.global_batch * tokens_per_sequence:,} tokens)" if tokens_per_sequence else ""
        return " x ".join(parts) + total + tokens + " per step"

    def _restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 load_weights: Callable[[Path], None]) -> TrainerState:
        """The trainer state to start from: a fresh one, or the checkpoint's (weights, optimizer, RNG). Under
        torchrun, rank 0 reads the checkpoint and every other rank receives it."""
        par, rt = self.parallel, self.plan.rt
        weights_only = self.resume_from is not None and not (self.resume_from / rundir.TRAINER_STATE).is_file()
        if self.resume_from is None:
            state = TrainerState()
        elif weights_only:
            state = self._start_from_weights(model, load_weights)
        elif not par.active:
            load_weights(self.resume_from)
            state = load_trainer_state(self.resume_from, optimizer)
        else:
            state = self._restore_distributed(model, optimizer, load_weights)
        if weights_only:  # nothing is resumed: a compressed or imported model
            self.say(f"starting from the weights of {self.resume_from} (a fresh optimizer)")
        elif self.resume_from is not None:
            self.say(f"resuming from {self.resume_from} (step {state.step})")
        state.global_batch, state.precision = self.plan.global_batch, rt.precision
        if rt.rank > 0:  # dropout masks of their own on the other ranks (rank 0 has the checkpoint's RNG)
            torch.manual_seed(self.plan.config.train.seed + 1_000_003 * rt.rank + state.step)
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
            if par.where.is_main:
                optimizer.load_state_dict(read["optimizer"])
            par.broadcast_optimizer(optimizer)
        return state

    def _save(self, state: TrainerState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              write_weights: Callable[[Path], None] | None = None) -> None:
        """Checkpoint ``state.step``, written by rank 0. Every rank calls it: under FSDP the full weights and
        optimizer state are gathered from all of them first (same files as one process writes)."""
        optimizer_state = None
        if self.parallel.sharded:
            weights = self.parallel.full_model_state(model)
            optimizer_state = self.parallel.full_optimizer_state(model, optimizer)
            def write_weights(folder: Path) -> None:  # noqa: E306 - the gathered weights, not the shards
                save_file(weights, str(folder / rundir.WEIGHTS))
        if self.parallel.where.is_main:
            save_checkpoint(self.run_dir, model, optimizer, state, self.plan.config.train.keep_last, write_weights,
                            optimizer_state)

    def say_done(self, summary: str, next_commands: list[str], too_short: str = "") -> None:
        """The closing lines: the summary (with ``too_short``, :attr:`LoopResult.too_short`, after it), where the
        checkpoint and the loss curve are, what to run next."""
        self.say(f"done: {summary}" + (f" | {too_short}" if too_short else ""))
        self.say(f"  checkpoint {rundir.latest_checkpoint(self.run_dir)} | loss curve {self.run_dir / 'loss.png'}")
        self.say("  next: " + "  |  ".join(next_commands))
