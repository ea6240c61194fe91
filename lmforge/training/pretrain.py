"""Pretraining: ``lmforge train``.

It reads like the algorithm because its parts live elsewhere: the set-up every training command
shares (runtime, run directory, resume, metrics) in ``session``, the loop in ``steps``, the optimizer
and schedule in ``optim``, checkpoints in ``checkpoint``, batches in ``data.loader``, and what each
architecture learns (its batches, loss, validation figures, samples) in ``objectives``.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import rundir
from lmforge.config import TrainConfig, validate_train_config
from lmforge.data.loader import open_split, prefetch_batches
from lmforge.data.prepare import format_summary, load_meta, prepare, prepared_default_dataset
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model import GPT, build_model
from lmforge.training.checkpoint import load_weights
from lmforge.training.metrics import format_duration
from lmforge.training.objectives import objective_for
from lmforge.training.parallel import Parallel
from lmforge.training.session import Trainee, TrainingSession
from lmforge.training.sparsity import MaskHolder


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float
    val_bpb: float
    train_time_s: float
    stopped_early: bool


def resolve_dataset(cfg: TrainConfig, run_dir: Path, progress: bool) -> Path:
    """The prepared dataset to train on: given, prepared from sources next to the run, or the default."""
    if cfg.data.dataset_dir:
        return Path(cfg.data.dataset_dir)
    if not cfg.data.sources:
        out = prepared_default_dataset(cfg.data, progress=progress)
    else:
        out = run_dir / rundir.PREPARED_DATA
        if not (out / "meta.json").is_file():
            prepare(cfg.data, out, progress=progress)
    return out


def check_same_data(run_dir: Path, dataset_dir: Path, meta: dict, allow_change: bool) -> None:
    """UserError if the dataset changed since the run started (it was prepared again from other text, or
    with another tokenizer): resuming would silently continue on other data. With ``allow_change``, a
    warning instead."""
    started = json.loads((run_dir / rundir.DATASET_META).read_text(encoding="utf-8"))
    if (started.get("content_hash"), started.get("splits")) == (meta.get("content_hash"), meta.get("splits")):
        return
    changed = (f"the dataset '{dataset_dir}' changed since the run started (content or token counts differ from "
               f"{run_dir / rundir.DATASET_META})")
    if not allow_change:
        raise UserError(f"cannot resume: {changed}; --allow-data-change resumes on it anyway")
    warnings.warn(f"{changed}: resuming on it (--allow-data-change)", stacklevel=2)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, allow_data_change: bool = False,
          on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> TrainResult:
    """Train per ``cfg`` (never modified: the run's resolved config is in its config.yaml); with ``resume``,
    continue the run in cfg.out_dir from its latest checkpoint (on the same data, unless ``allow_data_change``).
    on_eval(step, metrics) is called after every evaluation; True stops the run there (a sweep's pruner)."""
    validate_train_config(cfg)  # before anything is created
    with TrainingSession.open(cfg, resume, progress) as session:  # the run directory, locked until the end
        return _train(session, cfg, progress, allow_data_change, on_eval)


def _train(session: TrainingSession, cfg: TrainConfig, progress: bool, allow_data_change: bool,
           on_eval: Callable[[int, dict[str, float]], bool] | None) -> TrainResult:
    run_dir, par = session.run_dir, session.parallel

    # --- the plan: the data (prepared once, by rank 0), its vocabulary, the precision
    dataset_dir = par.on_rank0(lambda: resolve_dataset(cfg, run_dir, progress))
    meta = load_meta(dataset_dir)  # checked against its tokenizer (a damaged or foreign one: one line, every rank)
    if progress and par.where.is_main:
        print(f"dataset {dataset_dir}\n" + format_summary(meta), flush=True)
    tokenizer = Tokenizer.from_file(dataset_dir / "tokenizer.json")
    # What the model learns: the next token, masked tokens or hidden spans (the special tokens the last two need are
    # appended to the vocabulary here, and the run's tokenizer.json holds them).
    objective = objective_for(cfg, tokenizer, meta["splits"]["val"])

    def derived(config: TrainConfig) -> None:
        config.data.dataset_dir = str(dataset_dir)
        config.model.vocab_size = config.model.vocab_size or tokenizer.vocab_size
        tokenizer.check_fits(config.model.vocab_size, f"model.vocab_size={config.model.vocab_size}")

    plan = session.make_plan(cfg, derived)
    cfg, rt, tc = plan.config, plan.rt, plan.config.train
    if session.resume_from is not None:
        check_same_data(run_dir, dataset_dir, meta, allow_data_change)
    block = cfg.model.block_size
    train_shard, val_shard = (open_split(meta, split, block, cfg.model.vocab_size) for split in ("train", "val"))

    # --- the model, and what training it means
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = build_model(cfg.model).to(rt.device)
    model.activation_checkpointing = tc.activation_checkpointing
    n_params = model.num_params()
    flops_tok = objective.flops_per_token(cfg.model, n_params)

    def write_files(folder: Path) -> None:
        tokenizer.save(folder / rundir.TOKENIZER)
        shutil.copyfile(dataset_dir / "meta.json", folder / rundir.DATASET_META)

    def batches(step: int) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler = objective.sampler(train_shard, tc.batch_size, tc.seed, rt.rank, rt.world_size)
        return prefetch_batches(sampler, step, tc.grad_accum, rt.device)

    def evaluate(eval_model: torch.nn.Module, final: bool) -> dict[str, float]:
        # The final evaluation covers the whole val split (non-overlapping windows).
        n_batches = 10**9 if final else tc.eval_batches
        return objective.evaluate(eval_model, val_shard, tc.batch_size, n_batches, tc.seed, rt, par)

    out = session.train(Trainee(
        model=model, kind="pretrain", task=objective.task, lora=False,
        describe=f"model {cfg.model.family}, {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOPs/token",
        flops_per_token=flops_tok, write_files=write_files, load_state=lambda ckpt: load_weights(model, ckpt),
        batches=batches, loss=objective.loss, evaluate=evaluate,
        tokens_per_sequence=block, on_eval=on_eval,
        after_step=sparsity_mask(run_dir, model, par) if session.resume_from is not None else None))

    step, last_eval = out.step, out.last_eval
    session.say_done(f"{step} steps in {format_duration(out.train_time_s)} | val loss {last_eval['val_loss']:.4f} | "
                     f"{objective.figure(last_eval)} | {run_dir}",
                     [*objective.next_commands(run_dir), f"lmforge eval {run_dir}"]
                     + ([] if cfg.model.export_problem() else [f"lmforge export {run_dir} --out DIR"]), out.too_short)
    if progress and cfg.sample.num_samples > 0:
        sample_model = par.unsharded(model, lambda: build_model(cfg.model).to(rt.device))  # every rank (a gather)
        if rt.is_main:
            objective.print_samples(sample_model, tokenizer, cfg, val_shard, rt)
    return TrainResult(run_dir, step, last_eval["val_loss"], last_eval.get("val_bpb", math.nan), out.train_time_s,
                       out.stopped_early)


def sparsity_mask(run_dir: Path, model: GPT, par: Parallel) -> MaskHolder | None:
    """The mask a pruned run (``lmforge prune``, named in its run.json) trains under, or None."""
    mask = (rundir.read_run_info(run_dir).compression or {}).get("mask")
    if not mask:
        return None
    if par.sharded:
        raise UserError(f"{run_dir} is a pruned run with a sparsity mask: train it in one process or with "
                        f"parallel.strategy=ddp (the mask is not sharded)")
    return MaskHolder(model, run_dir / mask)
