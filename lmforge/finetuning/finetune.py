"""``lmforge finetune``: start from a trained model and adapt it (SFT, classification, token classification or
sequence-to-sequence, full or LoRA).

The optimisation loop, checkpoints, metrics and resume are pretraining's (:mod:`lmforge.training`);
this module builds what differs: the examples, the batches, the loss, the evaluation and, for LoRA
runs, adapter-only checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_model

from lmforge import rundir
from lmforge.config import FinetuneConfig, validate_finetune_config
from lmforge.data.loader import EpochSampler, to_device
from lmforge.errors import UserError
from lmforge.finetuning.classify import ClassifyTask
from lmforge.finetuning.seq2seq import Seq2SeqTask
from lmforge.finetuning.sft import SFTTask
from lmforge.finetuning.token_classify import TokenClassifyTask
from lmforge.loading import load_base
from lmforge.model import lora
from lmforge.model.gpt import flops_per_token
from lmforge.model.quantized import is_quantized
from lmforge.training.checkpoint import load_weights
from lmforge.training.metrics import MetricsLogger, format_duration
from lmforge.training.session import Trainee, TrainingSession
from lmforge.training.steps import format_metrics


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int
    metrics: dict
    """The final evaluation (val loss; exact match or accuracy/F1/confusion matrix)."""
    train_time_s: float
    too_short: str = ""
    """Why a time-budgeted run was too short for its recipe (:func:`lmforge.training.budget.too_short`), or ""."""


class FinetuneTask(Protocol):
    """What the command needs of a task (:class:`SFTTask`, :class:`ClassifyTask`, :class:`TokenClassifyTask`,
    :class:`Seq2SeqTask`)."""

    model: torch.nn.Module
    """The model to train: the base model, or the base model with a new head."""
    n_train: int
    """Training items (examples, or packed rows)."""
    summary: list[str]
    """Lines describing the data, printed at the start."""
    trainable_modules: list[str] | None
    """Modules trained in full even under LoRA (a new head)."""
    compare_with_base: bool
    """Evaluate (in full) before fine-tuning too, for comparison."""

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """Training items (by index) -> a micro-batch on the CPU."""

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Micro-batch -> scalar loss."""

    def evaluate(self, model: torch.nn.Module, final: bool) -> dict:
        """Metrics with val_loss; the final one adds the task's own figures."""

    def save_files(self, run_dir: Path) -> None:
        """Write what the run directory needs beyond config and tokenizer (labels, chat template)."""

    def final_lines(self, metrics: dict) -> list[str]:
        """What the end of the run prints beyond the scalar metrics."""


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True,
             on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> FinetuneResult:
    """Fine-tune per ``cfg`` (never modified: the run's resolved config is in its config.yaml); with ``resume``,
    continue the run in cfg.out_dir from its latest checkpoint. on_eval(step, metrics) is called after every
    evaluation; True stops the run there (a sweep's pruner)."""
    validate_finetune_config(cfg)  # before anything is created
    with TrainingSession.open(cfg, resume, progress) as session:  # the run directory, locked until the end
        return _finetune(session, cfg, on_eval)


def _finetune(session: TrainingSession, cfg: FinetuneConfig,
              on_eval: Callable[[int, dict[str, float]], bool] | None) -> FinetuneResult:
    run_dir, say = session.run_dir, session.say

    # --- the plan: the base and its model, the precision
    base = load_base(cfg.base, command="fine-tuning (base=)")
    if cfg.class_weights is not None and cfg.task != "classify":
        raise UserError(f"class_weights applies to task=classify; this run is task={cfg.task}")
    check_task_fits(cfg.task, base.model.cfg.arch, cfg.base)
    if is_quantized(base.model):
        raise UserError(f"base '{cfg.base}' is quantized (its integer weights do not train): fine-tune its source "
                        f"run, then quantize the result")
    if cfg.dropout is not None:
        base.model.set_dropout(cfg.dropout)

    def derived(config: FinetuneConfig) -> None:
        config.base = str(Path(cfg.base).resolve())
        config.model = dataclasses.replace(base.model.cfg)

    plan = session.make_plan(cfg, derived)
    cfg, rt, tc = plan.config, plan.rt, plan.config.train
    max_len = cfg.data.max_length or cfg.model.block_size
    if not 0 < max_len <= cfg.model.block_size:
        raise UserError(f"data.max_length={max_len} must be between 1 and the model's context "
                        f"({cfg.model.block_size})")

    # --- the task and its model, and what training it means
    torch.manual_seed(tc.seed)  # the same initial weights (a new head) on every rank
    task: FinetuneTask = (SFTTask(cfg, base.model, base.tokenizer, base.folder, max_len, rt) if cfg.task == "sft"
                          else ClassifyTask(cfg, base.model, base.tokenizer, max_len, rt) if cfg.task == "classify"
                          else Seq2SeqTask(cfg, base.model, base.tokenizer, max_len, rt) if cfg.task == "seq2seq"
                          else TokenClassifyTask(cfg, base.model, base.tokenizer, max_len, rt))
    for line in task.summary:
        say(line)
    model = task.model
    if cfg.lora.rank > 0:
        model = lora.apply_lora(model, cfg.lora, task.trainable_modules)
    model.to(rt.device)
    trainable, total = lora.trainable_fraction(model)
    n_params = sum(p.numel() for p in base.model.parameters())

    def load_state(ckpt: Path) -> None:
        if cfg.lora.rank > 0:
            lora.load_adapter(model, ckpt / rundir.ADAPTER)
        else:
            load_weights(model, ckpt)

    def write_files(folder: Path) -> None:
        base.tokenizer.save(folder / rundir.TOKENIZER)
        task.save_files(folder)

    sampler = EpochSampler(task.n_train, tc.batch_size, tc.seed, rt.rank, rt.world_size)

    def batches(step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            for micro in range(tc.grad_accum):
                yield tuple(to_device(t, rt.device) for t in task.batch(sampler.indices(step, micro, tc.grad_accum)))
            step += 1

    final_metrics: dict = {}

    def evaluate(eval_model: torch.nn.Module, final: bool) -> dict[str, float]:
        metrics = task.evaluate(eval_model, final)
        if final:
            final_metrics.update(metrics)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def before_training(eval_model: torch.nn.Module, logger: MetricsLogger) -> None:
        before = task.evaluate(eval_model, True)  # the base model's answers, for comparison
        logger.log({"step": 0, "kind": "eval", **{k: v for k, v in before.items() if isinstance(v, float)}})
        say(f"before fine-tuning: val loss {before['val_loss']:.4f} | exact match {before['exact_match']:.1%}")

    out = session.train(Trainee(
        model=model, kind="finetune", task=cfg.task, lora=cfg.lora.rank > 0,
        describe=f"{cfg.task} from {cfg.base} | trainable {trainable:,} of {total:,} parameters "
                 f"({trainable / total:.2%}){' with LoRA rank ' + str(cfg.lora.rank) if cfg.lora.rank else ''}",
        flops_per_token=flops_per_token(cfg.model, n_params), write_files=write_files, load_state=load_state,
        batches=batches, loss=task.loss, evaluate=evaluate, on_eval=on_eval,
        write_weights=(lambda d: lora.save_adapter(model, d / rundir.ADAPTER)) if cfg.lora.rank > 0 else None,
        before_training=before_training if task.compare_with_base else None))

    if cfg.lora.rank > 0 and cfg.lora.merge and rt.is_main:
        ckpt = rundir.latest_checkpoint(run_dir)
        write_merged(model, ckpt)
        say(f"merged the adapters into full weights: {ckpt / rundir.WEIGHTS}")
    if rt.is_main:
        (run_dir / rundir.FINAL_EVAL).write_text(json.dumps(final_metrics, indent=1) + "\n", encoding="utf-8")
    for line in task.final_lines(final_metrics):
        say(line)
    use = {"classify": f"lmforge predict {run_dir} --text TEXT",
           "token_classify": f"lmforge predict {run_dir} --file WORDS.jsonl",
           "seq2seq": f"lmforge generate {run_dir} -p SOURCE"}.get(
        cfg.task, f"lmforge generate {run_dir} --chat -p TEXT")
    session.say_done(f"{out.step} steps in {format_duration(out.train_time_s)} | val {format_metrics(final_metrics)} | "
                     f"{run_dir}", [use, f"lmforge export {run_dir} --out DIR"], out.too_short)
    return FinetuneResult(run_dir, out.step, final_metrics, out.train_time_s, out.too_short)


ARCHES = {"decoder": ("a decoder", "task=sft, classify or token_classify"),
          "encoder": ("an encoder", "task=classify or token_classify"),
          "encoder_decoder": ("an encoder-decoder", "task=seq2seq")}
"""Each model.arch: its name in errors, and the tasks that fine-tune it."""
NOT_ON_ENCODER_DECODER = {"sft": "chat fine-tuning of a decoder-only model does not apply to it",
                          "classify": "classification on an encoder-decoder is not built",
                          "token_classify": "token classification on an encoder-decoder is not built"}


def check_task_fits(task: str, arch: str, base: str) -> None:
    """UserError naming the base's model.arch and the tasks that fine-tune it, unless ``task`` is one of them."""
    name, tasks = ARCHES[arch]
    where = f"base '{base}' is {name} (model.arch={arch})"
    if arch == "encoder_decoder" and task != "seq2seq":
        raise UserError(f"{where}: task=seq2seq fine-tunes it (a target text for each source text); task={task}: "
                        f"{NOT_ON_ENCODER_DECODER[task]}")
    if task == "seq2seq" and arch != "encoder_decoder":
        raise UserError(f"{where}: task=seq2seq needs an encoder-decoder base (model.arch=encoder_decoder); "
                        f"{name} fine-tunes with {tasks}")
    if task == "sft" and arch == "encoder":
        raise UserError(f"{where}: it does not write text, so task=sft does not apply; {name} fine-tunes with "
                        f"{tasks}")


def write_merged(model: torch.nn.Module, ckpt: Path) -> None:
    """Add full weights (adapters merged) to a LoRA checkpoint, atomically; the adapters stay."""
    merged = lora.merge(model)
    tmp = ckpt / (rundir.WEIGHTS + ".tmp")
    save_model(merged, str(tmp))
    tmp.replace(ckpt / rundir.WEIGHTS)
    rundir.write_manifest(ckpt)
