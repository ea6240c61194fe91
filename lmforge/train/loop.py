"""The pretraining loop.

It reads like the algorithm because its parts live elsewhere: the runtime (device, precision,
rank) in ``runtime``, the optimizer and schedule in ``optim``, checkpoints in ``checkpoint``,
reporting in ``metrics``, batches in ``data.loader``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import FinetuneConfig, TrainConfig, save_yaml
from lmforge.data.loader import BatchSampler, TokenShard, bits_per_byte, prefetch_batches
from lmforge.data.prepare import format_summary, load_meta, prepare, prepared_default_dataset
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.lm import split_loss
from lmforge.model.gpt import GPT, flops_per_token
from lmforge.train.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from lmforge.train.metrics import MetricsLogger, format_duration, peak_flops
from lmforge.train.optim import build_optimizer
from lmforge.train.runtime import Runtime, maybe_compile, setup_runtime
from lmforge.train.steps import Job, run_steps


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float
    val_bpb: float
    train_time_s: float
    stopped_early: bool


def resolve_dataset(cfg: TrainConfig, progress: bool) -> Path:
    """The prepared dataset to train on: given, prepared from sources next to the run, or the default."""
    if cfg.data.dataset_dir:
        return Path(cfg.data.dataset_dir)
    if not cfg.data.sources:
        out = prepared_default_dataset(cfg.data, progress=progress)
    else:
        out = Path(cfg.out_dir) / "data"
        if not (out / "meta.json").is_file():
            prepare(cfg.data, out, progress=progress)
    if progress:
        print(f"dataset {out}\n" + format_summary(load_meta(out)), flush=True)
    return out


def fresh_run_dir(out_dir: str) -> Path:
    """``out_dir`` if it holds no run yet, else the first free ``out_dir-2``, ``-3``, ... (never overwrite)."""
    base = Path(out_dir)
    candidate, n = base, 1
    while (candidate / "config.yaml").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def open_run_dir(cfg: TrainConfig | FinetuneConfig, resume: bool) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from): cfg.out_dir and its latest checkpoint when resuming,
    else a fresh directory (cfg.out_dir is updated to it) and no checkpoint."""
    if resume:
        run_dir = Path(cfg.out_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"cannot resume: '{run_dir}' has no checkpoint")
        return run_dir, ckpt
    run_dir = fresh_run_dir(cfg.out_dir)
    cfg.out_dir = str(run_dir)
    return run_dir, None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train per ``cfg``; with ``resume``, continue the run in cfg.out_dir from its latest checkpoint."""
    tc = cfg.train
    rt = setup_runtime(tc.device, tc.precision, tc.threads, training=True)
    say = print if rt.is_main and progress else (lambda *a, **k: None)

    # --- the run directory, the data and the tokenizer
    run_dir, ckpt = open_run_dir(cfg, resume)
    dataset_dir = resolve_dataset(cfg, progress and rt.is_main)
    meta = load_meta(dataset_dir)
    tokenizer = Tokenizer.from_file(dataset_dir / "tokenizer.json")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{meta['vocab_size']} tokens in '{dataset_dir}'")
    cfg.data.dataset_dir = str(dataset_dir)
    if rt.is_main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer.json")
        shutil.copyfile(dataset_dir / "meta.json", run_dir / "dataset_meta.json")

    # --- model, optimizer, and the state to resume from
    torch.manual_seed(tc.seed + rt.rank)
    model = GPT(cfg.model).to(rt.device)
    model.activation_checkpointing = tc.activation_checkpointing
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    scaler = rt.grad_scaler()
    state = {"best_val_loss": math.inf, "evals_without_improvement": 0, "train_time_s": 0.0}
    start_step = 0
    if ckpt is not None:
        load_weights(model, ckpt)
        state.update(load_trainer_state(ckpt, optimizer))
        start_step = state["step"]
        say(f"resuming from {ckpt} (step {start_step})")
    step_model = maybe_compile(model, tc.compile)

    block = cfg.model.block_size
    train_batches = BatchSampler(TokenShard(dataset_dir, "train", meta["dtype"], block), tc.batch_size,
                                 tc.seed, rt.rank)
    val_shard = TokenShard(dataset_dir, "val", meta["dtype"], block)
    val_split = meta["splits"]["val"]

    n_params = model.num_params()
    flops_tok = flops_per_token(cfg.model, n_params)
    peak, peak_source = peak_flops(rt.device, rt.autocast_dtype or torch.float32)
    tokens_per_step = tc.batch_size * block * tc.grad_accum * rt.world_size
    say(f"run {run_dir} | model {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOPs/token | "
        f"{rt.device} {rt.precision} | {tokens_per_step} tokens/step | peak {peak / 1e12:.2f} TFLOP/s "
        f"({peak_source})")

    # --- the loop
    logger = MetricsLogger(run_dir, rt.is_main, start_step)

    def run_eval(final: bool) -> dict[str, float]:
        # The final evaluation covers the whole val split (non-overlapping windows).
        loss = split_loss(step_model, val_shard, rt, tc.batch_size, 10**9 if final else tc.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "val_bpb": bits_per_byte(loss, val_split["tokens"], val_split["bytes"])}

    def lm_loss(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return step_model(*batch)[1]

    job = Job(model=model, optimizer=optimizer, scaler=scaler,
              batches=prefetch_batches(train_batches, start_step, tc.grad_accum, rt.device), loss=lm_loss,
              evaluate=run_eval, save=lambda step, st: save_checkpoint(run_dir, step, model, optimizer, st,
                                                                         tc.keep_last),
              flops_per_token=flops_tok, peak_flops=peak)
    out = run_steps(job, cfg, rt, logger, state, start_step, say)
    step, last_eval = out.step, out.last_eval
    say(f"done: {step} steps in {format_duration(out.train_time_s)} | val loss {last_eval['val_loss']:.4f} | "
        f"{last_eval['val_bpb']:.4f} bits/byte | {run_dir}")
    if rt.is_main and progress and cfg.sample.num_samples > 0:
        print_samples(model, tokenizer, cfg, rt)
    return TrainResult(run_dir, step, last_eval["val_loss"], last_eval["val_bpb"], out.train_time_s,
                       out.stopped_early)


def print_samples(model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, rt: Runtime) -> None:
    from lmforge.generate import generate_text

    s = cfg.sample
    prompts = [s.prompt] * s.num_samples
    with rt.autocast():
        texts = generate_text(model, tokenizer, prompts, s.max_new_tokens, temperature=s.temperature,
                              top_k=s.top_k, seed=cfg.train.seed)
    for i, text in enumerate(texts):
        print(f"\n--- sample {i + 1} ---\n{s.prompt}{text}")
