"""Every CUDA path of lmforge, exercised and timed in one run: the script a lent GPU (H100/H200) runs.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--parts train,mfu] [--work DIR]
    python bench/gpu_check.py --dry --out /tmp/gpu_check.json    # the CPU, tiny shapes: what the test suite runs

Parts (``--parts`` runs a subset, in this order):

* ``train``: lmforge's training loop on a small prepared dataset (tinyshakespeare where the checkout has it, else
  Python stdlib source), bf16, torch.compile, fused AdamW, ``train.on_nonfinite=skip`` with a NaN loss injected
  at one step (the step is skipped, the run goes on); then flash attention forced for the model's shape
  (forward and backward under ``sdpa_kernel(FLASH_ATTENTION)``) and the SDPA kernel PyTorch picks by itself.
* ``mfu``: GPT-2 124M (context 1024, bf16, torch.compile) stepped as the loop steps it (clipping, the guard,
  fused AdamW): tokens/s and MFU against this GPU's measured bf16 GEMM peak (an 8192^3 matmul) and against
  its datasheet peak (``lmforge.hardware``); the goal, 50%, is reported, a miss is not a failure.
* ``parallel``: ``lmforge train --nproc 1`` under DDP, under FSDP2, and under FSDP2 with Muon (torchrun's agent,
  NCCL; gloo in the dry run), in fp32: their per-step losses against one plain process's.
* ``generate``: the trained run loaded back; greedy decoding with the KV cache against recomputing every step
  (fp32, TF32 off), then tokens/s with the cache (eager, and compiled on a GPU).
* ``serve``: the continuous-batching engine with every request in one batch: each greedy output against the
  prompt generated alone (fp32, TF32 off), and aggregate tokens/s (bf16 weights on a GPU, as ``lmforge serve``).
* ``quantize``: int8 and int4 (group 32) weights: val loss against the float model's, and tokens/s of decoding.

Each part runs under its own time budget (a part past it is stopped and recorded as failed), and a part that
fails does not stop the others: its one-line error and the tail of its traceback go into the JSON. The JSON is
written after every part (a run killed midway keeps what finished), with the Markdown table (part | status |
seconds | figures) printed at the end and written beside it (same name, ``.md``). A comparison that differs is
excused only at a near tie: where the reference's two best logits are within ``TIE`` of each other (another
kernel's rounding may pick either).

``--dry`` runs everything on the CPU with tiny shapes, fp32, no torch.compile and gloo, in about 20 s on 2 cores:
tests/test_gpu_check.py runs it, so the script cannot rot between GPU loans. Exit status: 0 when every part is ok,
1 when one failed, 2 for a command line that cannot run (no CUDA device without ``--dry``, an unknown part).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge import rundir
from lmforge.config import DataConfig, ModelConfig, OptimConfig, from_dict, load_train_config
from lmforge.data.loader import open_split
from lmforge.data.prepare import load_meta, prepare
from lmforge.generate import generate
from lmforge.hardware import cpu_name, peak_flops
from lmforge.inference import decode_setup
from lmforge.loading import load_run
from lmforge.model.gpt import GPT, flops_per_token
from lmforge.model.quantized import QuantSpec, quantize_model
from lmforge.options import GREEDY
from lmforge.runtime import Runtime, maybe_compile
from lmforge.serve.engine import Engine, Finished, Job, Token
from lmforge.training.guard import NonfiniteGuard
from lmforge.training.metrics import read_metrics
from lmforge.training.objectives import NextToken
from lmforge.training.optim import build_optimizer
from lmforge.training.pretrain import TrainResult, train
from lmforge.training.validation import split_loss

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ("shared/data/tinyshakespeare.txt", "../shared/data/tinyshakespeare.txt")
"""Where a checkout keeps tinyshakespeare (relative to the repository root); without it, stdlib source."""
STDLIB_MODULES = ("json", "argparse", "dataclasses", "textwrap", "typing", "pathlib", "inspect", "ast")

LOSS_RTOL = 1e-3
"""Per-step losses of one process under torchrun vs the plain loop: the relative difference allowed (as
tests/fixtures.py allows between numbers of processes; a real difference is far larger)."""
TIE = 1e-3
"""Two greedy decodes that part ways are excused where the reference's two best logits are within this."""
MFU_GOAL = 0.5
"""GPT-2 124M's MFU goal against the measured bf16 GEMM peak (llm.c: ~56-60% on an A100)."""


@dataclass(frozen=True)
class Sizes:
    """What differs between the full run (a GPU) and the dry run (the CPU, tiny shapes)."""

    corpus_chars: int | None
    """Characters of the corpus prepared (None: all)."""
    train_args: tuple[str, ...]
    """The training part's model and schedule (config overrides)."""
    train_steps: int
    nan_step: int
    """The step whose loss is made NaN (it must be skipped)."""
    mfu_model: dict[str, Any]
    mfu_batch: int
    mfu_warmup: int
    mfu_steps: int
    parallel_args: tuple[str, ...]
    gen_prompts: int
    gen_tokens: int
    serve_requests: int
    serve_tokens: int
    quant_batches: int
    """Val batches (of the training batch size) each model's loss is measured on."""
    quant_tokens: int
    gemm_size: int
    budgets: dict[str, float]
    """Seconds each part may take."""


FULL = Sizes(
    corpus_chars=None,
    train_args=("model.preset=llama-small", "model.block_size=256", "model.dropout=0", "train.batch_size=64",
                "optim.lr=1e-3", "optim.warmup_steps=40", "train.log_interval=20", "train.eval_interval=200",
                "train.eval_batches=10"),
    train_steps=400, nan_step=50,
    mfu_model={"preset": "gpt2-124m", "vocab_size": 50304, "block_size": 1024, "dropout": 0.0},
    mfu_batch=16, mfu_warmup=3, mfu_steps=20,
    parallel_args=("model.block_size=64", "train.batch_size=8", "train.max_steps=10"),
    gen_prompts=8, gen_tokens=128, serve_requests=32, serve_tokens=64, quant_batches=20, quant_tokens=64,
    gemm_size=8192,
    # 7.3 minutes at most; expected about 4 (compilation is most of it: train, mfu, the compiled decode).
    budgets={"train": 100, "mfu": 110, "parallel": 75, "generate": 80, "serve": 45, "quantize": 30},
)
DRY = Sizes(
    corpus_chars=60_000,
    train_args=("model.preset=llama-tiny", "model.n_layer=2", "model.block_size=64", "model.dropout=0",
                "train.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2", "train.log_interval=4",
                "train.eval_interval=16", "train.eval_batches=1"),
    train_steps=16, nan_step=5,
    mfu_model={"preset": "gpt2-tiny", "n_layer": 2, "vocab_size": 256, "block_size": 64, "dropout": 0.0},
    mfu_batch=4, mfu_warmup=1, mfu_steps=3,
    parallel_args=("model.block_size=32", "train.batch_size=4", "train.max_steps=6"),
    gen_prompts=3, gen_tokens=16, serve_requests=8, serve_tokens=12, quant_batches=2, quant_tokens=8,
    gemm_size=512,
    budgets={"train": 60, "mfu": 60, "parallel": 90, "generate": 60, "serve": 60, "quantize": 60},
)


class PartTimeout(Exception):
    """A part ran past its time budget."""


class CheckFailed(Exception):
    """A part ran, but what it checks did not hold."""


@dataclass
class Context:
    """What the parts share: the device and precision, the working folder, the dataset and the trained run."""

    sizes: Sizes
    device: torch.device
    precision: str
    """The timed paths' precision: bf16 on a GPU, fp32 in the dry run."""
    work: Path
    deadline: float = math.inf
    """time.monotonic() at which the running part's budget ends."""
    run_dir: Path | None = None
    """The train part's run (or a fallback trained on demand)."""
    corpus_source: str = ""
    """Where the training text came from (set once it is read)."""
    _dataset: Path | None = None
    _corpus: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def rt(self) -> Runtime:
        return Runtime(self.device, self.precision)

    def left(self) -> float:
        """Seconds left of the running part's budget."""
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        """Wait for the GPU (before and after a timing); nothing on the CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def corpus(self) -> str:
        """The training text: tinyshakespeare if the checkout has it, else Python stdlib source."""
        if self._corpus is None:
            found = [ROOT / p for p in SHAKESPEARE if (ROOT / p).is_file()]
            if found:
                text, self.corpus_source = found[0].read_text(encoding="utf-8"), str(found[0].resolve())
            else:
                import importlib

                text = "\n".join(Path(importlib.import_module(m).__file__).read_text(encoding="utf-8")
                                 for m in STDLIB_MODULES)
                self.corpus_source = "the source of Python's " + ", ".join(STDLIB_MODULES)
            self._corpus = text[: self.sizes.corpus_chars] if self.sizes.corpus_chars else text
            self.corpus_source += f" ({len(self._corpus):,} characters)"
        return self._corpus

    def dataset(self) -> Path:
        """The corpus prepared once (characters as tokens, 10% held out)."""
        if self._dataset is None:
            src, out = self.work / "corpus.txt", self.work / "dataset"
            src.write_text(self.corpus(), encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)
            prepare(DataConfig(sources=[str(src)], tokenizer="char", val_fraction=0.1), out, progress=False)
            self._dataset = out
        return self._dataset

    def trained_run(self, figures: dict[str, Any]) -> Path:
        """The train part's run (this invocation's, else an earlier one's in the same --work); without one, a plain
        run trained now (no compile, no NaN step)."""
        earlier = self.work / "train"
        if self.run_dir is None and (earlier / rundir.CONFIG).is_file() and rundir.latest_checkpoint(earlier):
            figures["run"] = f"{earlier}, trained by an earlier invocation"
            self.run_dir = earlier
        if self.run_dir is None:
            figures["run"] = "fallback (no train part's run): trained now, without compile"
            self.run_dir = train_run(self, self.work / "fallback", compile_=False, nan_step=None).run_dir
        return self.run_dir


# --- helpers ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread once ``seconds`` have passed (SIGALRM)."""
    def expire(_signum: int, _frame: object) -> None:
        raise PartTimeout(f"stopped: past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """fp32 matmuls in full fp32 on a GPU (lmforge's runtime turns TF32 on), for token-for-token comparisons."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def nan_loss_at(step: int | None) -> Iterator[None]:
    """Make the training loss NaN at micro-batch ``step`` (from 1; one micro-batch per step), outside the compiled
    model: the next-token objective's loss is wrapped, as tests/training/test_nonfinite.py wraps the forward."""
    original = NextToken.loss
    calls = 0

    def loss(self: NextToken, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        value = original(self, model, batch)
        return value * float("nan") if calls == step else value

    NextToken.loss = loss
    try:
        yield
    finally:
        NextToken.loss = original


def override(args: tuple[str, ...], key: str) -> str:
    """The value ``key=VALUE`` in config overrides ``args`` sets."""
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{key}="))


def one_line(e: BaseException) -> str:
    """An exception as its last traceback line: ``ValueError: boom``."""
    return traceback.format_exception_only(type(e), e)[-1].strip()


def records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl."""
    return read_metrics(run_dir / "metrics.jsonl")


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "train"}


def measure_gemm(ctx: Context, dtype: torch.dtype) -> float:
    """FLOP/s of a square ``gemm_size`` matmul in ``dtype``: the best of 5 rounds of 10 back to back (the best: a
    moment of contention must not lower the peak that MFU divides by)."""
    n = ctx.sizes.gemm_size
    gen = torch.Generator(ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(5):
        ctx.sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        ctx.sync()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best


def prompts_from(ctx: Context, tokenizer: Any, n: int, max_len: int) -> list[list[int]]:
    """``n`` prompts of different lengths (at most ``max_len`` tokens), cut from the corpus."""
    text = ctx.corpus()
    out = []
    for i in range(n):
        length = 4 + (7 * i) % max(1, max_len - 3)
        start = (len(text) // (n + 1)) * (i + 1)
        out.append(tokenizer.encode(text[start: start + length])[:max_len] or [tokenizer.eot_id])
    return out


def top2_margin(model: GPT, ids: list[int]) -> float:
    """The gap between the two best next-token logits after ``ids`` (one full forward, no cache)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids[-model.cfg.block_size:]], device=model.device))[0][0, -1].float()
    best = logits.topk(2).values
    return float(best[0] - best[1])


def divergences(model: GPT, prompts: list[list[int]], got: list[list[int]], want: list[list[int]]) -> tuple[
        list[str], int]:
    """(rows whose greedy tokens differ from the reference other than at a near tie, rows excused at one)."""
    unexplained, ties = [], 0
    for row, (a, b) in enumerate(zip(got, want, strict=True)):
        if a == b:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        margin = top2_margin(model, prompts[row] + b[:i])
        if margin < TIE:
            ties += 1
        else:
            unexplained.append(f"row {row} from token {i} (margin {margin:.3g})")
    return unexplained, ties


def timed_generate(ctx: Context, model: torch.nn.Module, prompts: list[list[int]], tokens: int,
                   rt: Runtime) -> float:
    """Tokens/s of greedy decoding ``prompts`` as one batch, after the same call as a warm-up (which compiles: a
    compiled model compiles again for another KV cache length, so the warm-up cannot be shorter)."""
    with rt.autocast():
        generate(model, prompts, tokens, temperature=0)
        ctx.sync()
        t = time.perf_counter()
        out = generate(model, prompts, tokens, temperature=0)
        ctx.sync()
    return sum(map(len, out)) / (time.perf_counter() - t)


def train_run(ctx: Context, out: Path, compile_: bool, nan_step: int | None) -> TrainResult:
    """lmforge's training loop on the prepared dataset, with the part's model (and a NaN loss at ``nan_step``)."""
    sz = ctx.sizes
    shutil.rmtree(out, ignore_errors=True)  # a rerun with the same --work trains afresh
    cfg = load_train_config(None, [
        f"data.dataset_dir={ctx.dataset()}", f"out_dir={out}", *sz.train_args, f"train.device={ctx.device.type}",
        f"train.precision={ctx.precision}", f"train.compile={str(compile_).lower()}", "optim.name=adamw",
        f"train.max_steps={sz.train_steps}", f"train.ckpt_interval={sz.train_steps}", "train.on_nonfinite=skip",
        "sample.num_samples=0"])
    with nan_loss_at(nan_step):
        return train(cfg, progress=False)


# --- the parts -------------------------------------------------------------------------------------------------


def part_train(ctx: Context, fig: dict[str, Any]) -> None:
    """lmforge's loop (bf16, compile, fused AdamW, a NaN step skipped), then flash attention for its shape."""
    sz, problems = ctx.sizes, []
    fig.update(precision=ctx.precision, compile=ctx.cuda)
    result = train_run(ctx, ctx.work / "train", compile_=ctx.cuda, nan_step=sz.nan_step)
    recs = records(result.run_dir)
    trained = [r for r in recs if r["kind"] == "train"]
    steady = trained[1:] or trained  # the first log interval holds the compilation
    fig.update(steps=result.step, first_loss=trained[0]["loss"], final_loss=trained[-1]["loss"],
               val_loss=result.val_loss, train_s=result.train_time_s,
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
               loop_mfu=statistics.median(r["mfu"] for r in steady),
               skipped=[r["step"] for r in recs if r["kind"] == "skip"])
    ctx.run_dir = result.run_dir
    if result.step != sz.train_steps:
        problems.append(f"stopped at step {result.step} of {sz.train_steps}")
    if fig["skipped"] != [sz.nan_step]:
        problems.append(f"skipped steps {fig['skipped']}, expected [{sz.nan_step}] (the NaN step)")
    if not (math.isfinite(fig["final_loss"]) and fig["final_loss"] < fig["first_loss"]):
        problems.append(f"the loss went from {fig['first_loss']:.4g} to {fig['final_loss']:.4g}")

    run = load_run(result.run_dir, ctx.device)  # refuses non-finite weights: the NaN step changed nothing
    model = run.model
    guard = NonfiniteGuard(build_optimizer(model, OptimConfig(), ctx.device, ctx.precision), "skip", 1, ctx.device)
    fig["guard_on_device"] = guard.on_device  # fused AdamW reads found_inf: no host sync per step
    if not guard.on_device:
        problems.append("the optimizer cannot take found_inf: the guard syncs every step")
    fig.update(flash_attention(ctx, model, min(8, int(override(sz.train_args, "train.batch_size")))))
    if not fig["flash_ok"]:
        problems.append(f"flash attention unusable for this shape: {fig['flash_error']}")
    if problems:
        raise CheckFailed("; ".join(problems))


def flash_attention(ctx: Context, model: GPT, batch: int) -> dict[str, Any]:
    """Whether a training step of ``model``'s shape runs with SDPA limited to flash attention, and which SDPA
    kernels an unrestricted forward dispatches to."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg = model.cfg
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=ctx.device)
    out: dict[str, Any] = {"flash_ok": True}
    model.train()
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            with ctx.rt.autocast():
                loss = model(x, x)[1]
            loss.backward()
        ctx.sync()
    except RuntimeError as e:
        out.update(flash_ok=False, flash_error=one_line(e))
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad(), ctx.rt.autocast():
        model(x, x)
    out["sdpa_kernels"] = sorted({e.key for e in prof.key_averages() if "_scaled_dot_product" in e.key})
    return out


def part_mfu(ctx: Context, fig: dict[str, Any]) -> None:
    """GPT-2 124M stepped as the loop steps it (clipping, the guard, fused AdamW): tokens/s and MFU."""
    sz = ctx.sizes
    dtype = ctx.rt.autocast_dtype or torch.float32
    measured = measure_gemm(ctx, dtype)
    fig.update(gemm_dtype=str(dtype).removeprefix("torch."), gemm_size=sz.gemm_size,
               measured_peak_tflops=measured / 1e12)
    cfg = from_dict(ModelConfig, sz.mfu_model)
    torch.manual_seed(0)
    model = GPT(cfg).to(ctx.device).train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), ctx.device, ctx.precision)
    guard = NonfiniteGuard(optimizer, "halt", 0, ctx.device)
    step_model = maybe_compile(model, ctx.cuda)
    params = [p for p in model.parameters() if p.requires_grad]
    batch, context = sz.mfu_batch, cfg.block_size
    data = torch.randint(0, cfg.vocab_size, (4, batch, context + 1), device=ctx.device)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with ctx.rt.autocast():
            loss = step_model(x, y)[1]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        guard.step(i + 1, loss.detach(), norm)
        optimizer.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for i in range(sz.mfu_warmup):
        step(i)
    ctx.sync()
    fig["warmup_s"] = time.perf_counter() - t  # compilation included
    done, t = 0, time.perf_counter()
    # The planned steps, fewer if the budget runs short (at least 3).
    while done < sz.mfu_steps and (done < 3 or ctx.left() > 15):
        step(sz.mfu_warmup + done)
        done += 1
    ctx.sync()
    seconds = time.perf_counter() - t
    if guard.settle():
        raise CheckFailed("a non-finite step while training on random tokens")
    tokens_per_s = batch * context * done / seconds
    achieved = tokens_per_s * flops_per_token(cfg, model.num_params(), context)
    fig.update(model=sz.mfu_model["preset"], params_m=model.num_params() / 1e6, batch=batch, context=context,
               compile=ctx.cuda, timed_steps=done, step_ms=seconds / done * 1e3, tokens_per_s=tokens_per_s,
               achieved_tflops=achieved / 1e12, mfu=achieved / measured)
    spec, source = peak_flops(ctx.device, dtype)
    fig.update(lmforge_peak_tflops=spec / 1e12, lmforge_peak_source=source, mfu_vs_lmforge_peak=achieved / spec)
    fig["goal"] = f"{'pass' if fig['mfu'] >= MFU_GOAL else 'miss'} (>= {MFU_GOAL:.0%})" if ctx.cuda else "n/a (dry)"
    if not 0 < fig["mfu"] <= 1:
        raise CheckFailed(f"MFU {fig['mfu']:.3g} against the measured peak is impossible: a timing is wrong")


def part_parallel(ctx: Context, fig: dict[str, Any]) -> None:
    """``lmforge train --nproc 1`` under DDP, FSDP2 and FSDP2 with Muon, against one plain process, in fp32."""
    work = ctx.work / "parallel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [f"data.dataset_dir={ctx.dataset()}", "model.preset=gpt2-tiny", "model.pos_embedding=rope",
            "model.norm=rmsnorm", "model.bias=false", "model.n_layer=2", "model.dropout=0", *ctx.sizes.parallel_args,
            "train.precision=fp32", f"train.device={ctx.device.type}", "train.log_interval=1",
            "train.eval_interval=1000", "train.eval_batches=1", "train.ckpt_interval=1000", "optim.warmup_steps=2",
            "sample.num_samples=0"]
    runs = {"ddp": ("ddp", "adamw"), "fsdp": ("fsdp", "adamw"), "fsdp_muon": ("fsdp", "muon")}
    fig["backend"] = "nccl" if ctx.cuda else "gloo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not ctx.cuda:
        env["OMP_NUM_THREADS"] = "1"  # three processes and this one on a few cores (see main)
    procs: dict[str, subprocess.Popen] = {}
    finished: dict[str, float] = {}
    start = time.perf_counter()
    try:
        for name, (strategy, optim) in runs.items():
            with open(work / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "lmforge", "train", "--nproc", "1", *args, f"optim.name={optim}",
                     f"parallel.strategy={strategy}", f"out_dir={work / name}"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        # Meanwhile, in this process: the plain loop, the reference.
        refs = {optim: train(load_train_config("default", [*args, f"optim.name={optim}",
                                                           f"out_dir={work / f'plain_{optim}'}"]),
                             progress=False).run_dir for optim in ("adamw", "muon")}
        while len(finished) < len(procs):
            if ctx.left() < 2:
                raise PartTimeout(f"{sorted(set(procs) - set(finished))} still running at the end of the budget")
            for name, proc in procs.items():
                if name not in finished and proc.poll() is not None:
                    finished[name] = time.perf_counter() - start
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the agent and its worker
                proc.wait()
    problems = []
    for name, (strategy, optim) in runs.items():
        fig[f"{name}_s"] = finished[name]
        if procs[name].returncode != 0:
            tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            problems.append(f"{name} exited {procs[name].returncode}: {' | '.join(tail)}")
            continue
        run = work / name
        memory = [r for r in records(run) if r["kind"] == "memory"]
        if not memory or (memory[0]["strategy"], memory[0]["world_size"]) != (strategy, 1):
            problems.append(f"{name} did not run as {strategy} under torchrun (metrics: {memory})")
        ref, got = train_losses(refs[optim]), train_losses(run)
        if sorted(got) != sorted(ref):
            problems.append(f"{name} logged steps {sorted(got)}, the plain loop {sorted(ref)}")
            continue
        diff = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
        fig[f"{name}_max_rel_diff"] = diff
        fig[f"{name}_final_loss"] = got[max(got)]
        if diff > LOSS_RTOL:
            problems.append(f"{name}: losses differ from the plain loop's by up to {diff:.3g} (relative)")
    if problems:
        raise CheckFailed("; ".join(problems))


def part_generate(ctx: Context, fig: dict[str, Any]) -> None:
    """The trained run loaded back: greedy with the KV cache == without it; tokens/s with it."""
    sz = ctx.sizes
    run = load_run(ctx.trained_run(fig), ctx.device)
    model, block = run.model, run.model.cfg.block_size
    prompts = prompts_from(ctx, run.tokenizer, sz.gen_prompts, block - sz.gen_tokens - 1)
    with exact_matmuls():  # fp32 as loaded
        cached = generate(model, prompts, sz.gen_tokens, temperature=0)
        full = generate(model, prompts, sz.gen_tokens, temperature=0, use_cache=False)
        unexplained, ties = divergences(model, prompts, cached, full)
    fig.update(prompts=len(prompts), new_tokens=sz.gen_tokens, cache_equals_no_cache=not unexplained,
               near_ties=ties)
    model, rt, why = decode_setup(model, ctx.rt, ctx.precision)
    fig["weights"] = why
    fig["tokens_per_s_b1"] = timed_generate(ctx, model, prompts[:1], sz.gen_tokens, rt)
    fig[f"tokens_per_s_b{len(prompts)}"] = timed_generate(ctx, model, prompts, sz.gen_tokens, rt)
    if ctx.cuda:  # `lmforge generate --compile`: one dynamic graph for the prefill and every step
        if ctx.left() > 45:  # compiling the decode takes ~30 s on a fresh machine
            compiled = maybe_compile(model, True, dynamic=True)
            fig["compiled_tokens_per_s_b1"] = timed_generate(ctx, compiled, prompts[:1], sz.gen_tokens, rt)
        else:
            fig["compiled_tokens_per_s_b1"] = "skipped (budget)"
    if unexplained:
        raise CheckFailed("greedy with the KV cache differs from without it: " + "; ".join(unexplained))


def serve_all(engine: Engine, prompts: list[list[int]], tokens: int, ctx: Context) -> tuple[list[list[int]], float]:
    """Every prompt queued, then served by ``engine`` in one go: (each one's greedy tokens, seconds)."""
    outs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def listener(i: int) -> Callable[[Token | Finished], None]:
        def on(event: Token | Finished) -> None:
            if isinstance(event, Finished):
                reasons[i] = event.reason if event.error is None else f"{event.reason}: {event.error}"
                done.release()
            else:
                outs[i].append(event.id)
        return on

    for i, p in enumerate(prompts):  # all queued before the engine starts: admitted into one batch
        engine.submit(Job(p, tokens, emit=listener(i), sampling=GREEDY))
    ctx.sync()
    t = time.perf_counter()
    engine.start()
    try:
        for _ in prompts:
            if not done.acquire(timeout=max(1.0, ctx.left())):
                raise PartTimeout("the engine did not finish every request within the budget")
    finally:
        engine.stop()
    ctx.sync()
    seconds = time.perf_counter() - t
    if set(reasons) != {"length"}:
        raise CheckFailed(f"requests ended with {sorted(set(map(str, reasons)))}, expected 'length' for all")
    return outs, seconds


def part_serve(ctx: Context, fig: dict[str, Any]) -> None:
    """The continuous-batching engine: every request's greedy tokens == its prompt generated alone; tokens/s."""
    sz = ctx.sizes
    run = load_run(ctx.trained_run(fig), ctx.device)
    model = run.model
    n = sz.serve_requests
    prompts = prompts_from(ctx, run.tokenizer, n, model.cfg.block_size - 2 * sz.serve_tokens - 1)
    with exact_matmuls():  # fp32 as loaded
        engine = Engine(model, Runtime(ctx.device, "fp32"), max_batch=n, max_queue=n)
        outs, seconds = serve_all(engine, prompts, sz.serve_tokens, ctx)
        alone = [generate(model, [p], sz.serve_tokens, temperature=0)[0] for p in prompts]
        unexplained, ties = divergences(model, prompts, outs, alone)
    peak_batch = engine.peak_batch
    fig.update(requests=n, new_tokens=sz.serve_tokens, peak_batch=peak_batch,
               equals_alone=not unexplained, near_ties=ties, fp32_tokens_per_s=sum(map(len, outs)) / seconds)
    if ctx.cuda:  # timed as `lmforge serve` runs: the weights in bf16
        model, rt, why = decode_setup(model, ctx.rt, ctx.precision)
        engine = Engine(model, rt, max_batch=n, max_queue=n)
        timed, seconds = serve_all(engine, prompts, 2 * sz.serve_tokens, ctx)
        fig.update(weights=why, bf16_tokens_per_s=sum(map(len, timed)) / seconds,
                   bf16_prefix_agreement=statistics.mean(
                       next((k for k, (a, b) in enumerate(zip(t, o, strict=False)) if a != b), len(o)) / len(o)
                       for t, o in zip(timed, outs, strict=True)))
    fig["tokens_per_s"] = fig.get("bf16_tokens_per_s", fig["fp32_tokens_per_s"])
    problems = []
    if peak_batch != n:
        problems.append(f"the engine ran at most {peak_batch} of {n} requests in one step")
    if unexplained:
        problems.append("a request's tokens differ from its prompt alone: " + "; ".join(unexplained))
    if problems:
        raise CheckFailed("; ".join(problems))


def part_quantize(ctx: Context, fig: dict[str, Any]) -> None:
    """int8 and int4 weights: val loss against the float model's, and tokens/s of batch-1 decoding."""
    sz = ctx.sizes
    path = ctx.trained_run(fig)
    run = load_run(path, ctx.device)
    cfg = run.config
    val = open_split(load_meta(cfg.data.dataset_dir), "val", cfg.model.block_size, cfg.model.vocab_size)
    batch = int(override(sz.train_args, "train.batch_size"))
    prompt = prompts_from(ctx, run.tokenizer, 1, cfg.model.block_size - sz.quant_tokens - 1)
    models = {"float": run.model,
              "int8": quantize_model(load_run(path, ctx.device).model, QuantSpec("int8")),
              "int4": quantize_model(load_run(path, ctx.device).model, QuantSpec("int4", 32))}
    problems = []
    for name, model in models.items():
        loss = split_loss(model, val, ctx.rt, batch, sz.quant_batches)  # under the run's autocast
        fig[f"{name}_val_loss"] = loss
        model, rt, _ = decode_setup(model, ctx.rt, ctx.precision)
        fig[f"{name}_tokens_per_s"] = timed_generate(ctx, model, prompt, sz.quant_tokens, rt)
        if not math.isfinite(loss):
            problems.append(f"{name}: val loss {loss}")
    for name, limit in (("int8", 1.05), ("int4", 1.25)):
        ratio = math.exp(fig[f"{name}_val_loss"] - fig["float_val_loss"])
        fig[f"{name}_ppl_ratio"] = ratio
        if not ratio <= limit:
            problems.append(f"{name} perplexity {ratio:.3f}x the float model's (allowed: {limit}x)")
    if problems:
        raise CheckFailed("; ".join(problems))


@dataclass(frozen=True)
class Part:
    """A part of the check: what runs it (filling in its figures; raising if it fails), and its headline."""

    run: Callable[[Context, dict[str, Any]], None]
    headline: tuple[str, ...]
    """The figures the Markdown table shows (the JSON has them all)."""


PARTS: dict[str, Part] = {
    "train": Part(part_train, ("steps", "final_loss", "tokens_per_s", "skipped", "flash_ok", "sdpa_kernels")),
    "mfu": Part(part_mfu, ("tokens_per_s", "mfu", "measured_peak_tflops", "mfu_vs_lmforge_peak", "goal")),
    "parallel": Part(part_parallel, ("backend", "ddp_max_rel_diff", "fsdp_max_rel_diff", "fsdp_muon_max_rel_diff")),
    "generate": Part(part_generate, ("cache_equals_no_cache", "tokens_per_s_b1", "compiled_tokens_per_s_b1")),
    "serve": Part(part_serve, ("requests", "equals_alone", "tokens_per_s")),
    "quantize": Part(part_quantize, ("int8_ppl_ratio", "int4_ppl_ratio", "float_tokens_per_s", "int8_tokens_per_s",
                                     "int4_tokens_per_s")),
}


# --- running and reporting ---------------------------------------------------------------------------------------


def run_part(ctx: Context, name: str) -> dict[str, Any]:
    """One part under its budget: {"status", "seconds", "budget_s", "figures"[, "error", "traceback"]}."""
    budget = ctx.sizes.budgets[name]
    figures: dict[str, Any] = {}
    out: dict[str, Any] = {"status": "ok", "budget_s": budget, "figures": figures}
    print(f"[{name}] started (budget {budget:.0f} s)", flush=True)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t = time.perf_counter()
    ctx.deadline = time.monotonic() + budget
    try:
        with time_limit(budget):
            PARTS[name].run(ctx, figures)
    except Exception as e:  # noqa: BLE001 - a part's failure is recorded, and the next part runs
        out.update(status="failed", error=one_line(e), traceback=traceback.format_exc()[-3000:])
    out["seconds"] = time.perf_counter() - t
    if ctx.cuda:
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    gc.collect()
    if "torch._dynamo" in sys.modules:  # the next part's compiles start afresh (and from zero recompiles)
        torch._dynamo.reset()
    if ctx.cuda:
        torch.cuda.empty_cache()
    print(f"[{name}] {out['status']} in {out['seconds']:.1f} s" + (f": {out['error']}" if "error" in out else ""),
          flush=True)
    return out


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device's name and what else a reader of the results needs to know about it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": ".".join(
            map(str, torch.cuda.get_device_capability(device))), "memory_gib": props.total_memory / 2**30,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "bf16": torch.cuda.is_bf16_supported()}
    return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()}


def format_value(value: Any) -> str:
    """A figure as the Markdown table shows it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(format_value, value)) + "]"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    """part | status | seconds | figures (each part's headline figures), under a line naming the device."""
    dev = report["device"]
    lines = [f"{report['mode']} run on {dev['name']} ({dev['type']}), torch {report['torch']}, "
             f"{report['wall_s']:.0f} s", "", "| part | status | seconds | figures |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        figs = part["figures"]
        shown = "; ".join(f"{k} {format_value(figs[k])}" for k in PARTS[name].headline if k in figs)
        status = part["status"] + (f": {part['error']}" if "error" in part else "")
        lines.append(f"| {name} | {status.replace('|', '/')} | {part['seconds']:.1f} | {shown.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="the CPU, tiny shapes, fp32, gloo (what the test suite runs)")
    ap.add_argument("--out", help="the JSON (default: bench/results/gpu_check.json; dry: in the temp folder); the "
                                  "Markdown table goes beside it")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"a comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--work", help="folder for the dataset and the runs (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        print(f"gpu_check: unknown part(s) {unknown or args.parts!r}; expected some of {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry runs the same checks on the CPU with tiny shapes",
              file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry else torch.device("cuda", torch.cuda.current_device())
    if args.dry:
        # One thread, here and in the subprocesses: tiny shapes gain little from more, and on a machine busy with
        # other work (a test suite) two threads' barriers made GEMMs ~6x slower than one thread.
        torch.set_num_threads(1)
    default_out = Path(tempfile.gettempdir()) / "gpu_check_dry.json" if args.dry \
        else ROOT / "bench" / "results" / "gpu_check.json"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(DRY if args.dry else FULL, device, "fp32" if args.dry else "bf16", work.resolve())
    report: dict[str, Any] = {"mode": "dry" if args.dry else "full", "device": describe_device(device),
                              "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "wall_s": 0.0, "corpus": "", "sizes": vars(ctx.sizes), "parts": {}}
    print(f"gpu_check: {report['mode']} run on {report['device']['name']}, parts {', '.join(parts)}; "
          f"work {work}, results {out}", flush=True)
    t = time.perf_counter()
    try:
        for name in parts:
            report["parts"][name] = run_part(ctx, name)
            report["wall_s"], report["corpus"] = time.perf_counter() - t, ctx.corpus_source
            out.write_text(json.dumps(strict_json(report), indent=1) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(report)
    out.with_suffix(".md").write_text(table)
    print("\n" + table, flush=True)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
