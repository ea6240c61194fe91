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

from lmforge import rundir
from lmforge.config import ModelConfig, changed_keys, save_yaml, to_dict, to_yaml
from lmforge.errors import TrainingInterrupted
from lmforge.hardware import peak_flops
from lmforge.runtime import Runtime, setup_runtime
from lmforge.training.checkpoint import TrainerState, load_trainer_state
from lmforge.training.metrics import MetricsLogger
from lmforge.training.precision import choose_precision
from lmforge.training.steps import Job, LoopConfig, LoopResult, run_steps


class RunConfig(LoopConfig, Protocol):
    """A training command's config: the loop's sections and the run directory to write."""

    out_dir: str


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
    precision_reason: str = ""
    """Why the runtime trains in its precision (see :meth:`choose_precision`), for the run header."""

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool, progress: bool) -> TrainingSession:
        """Pick the runtime and the run directory: cfg.out_dir to resume, else a fresh one (cfg.out_dir
        is set to it)."""
        tc = cfg.train
        rt = setup_runtime(tc.device, tc.precision, tc.threads)
        asked = Path(cfg.out_dir)
        run_dir, ckpt = rundir.open_run_dir(asked, resume)
        cfg.out_dir = str(run_dir)
        session = cls(cfg, rt, run_dir, ckpt, print if rt.is_main and progress else _quiet)
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

    def restore(self, optimizer: torch.optim.Optimizer, load_weights: Callable[[Path], None]) -> TrainerState:
        """The trainer state to start from: a fresh one, or the checkpoint's (weights, optimizer, RNG)."""
        if self.resume_from is None:
            return TrainerState()
        load_weights(self.resume_from)
        state = load_trainer_state(self.resume_from, optimizer)
        self.say(f"resuming from {self.resume_from} (step {state.step})")
        return state

    def choose_precision(self, model_cfg: ModelConfig) -> None:
        """Settle the training precision for this model: train.precision, or for 'auto' the faster one as
        measured on this machine (:mod:`lmforge.training.precision`)."""
        choice = choose_precision(self.cfg.train.precision, model_cfg, self.rt.device)
        self.rt.precision, self.precision_reason = choice.precision, choice.reason

    def describe_device(self) -> str:
        """``cpu fp32 (auto: bf16 measured 0.01x fp32 here)``: the header's device and precision."""
        reason = f" ({self.precision_reason})" if self.precision_reason else ""
        return f"{self.rt.device} {self.rt.precision}{reason}"

    def peak_flops(self) -> tuple[float, str]:
        """Peak FLOP/s of this device in the training precision, and where the figure came from."""
        return peak_flops(self.rt.device, self.rt.autocast_dtype or torch.float32)

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
            return run_steps(job, self.cfg, self.rt, logger, state, self.say)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(f"{e}; continue with --resume {self.run_dir}") from None
