"""The training precision, chosen by measuring this model's step on this machine (``train.precision=auto``).

On a CPU the answer differs by host more than any flag tells: bf16 trained the default model 1.8x
faster than fp32 on an EPYC with AVX512-BF16 and no AMX, ~3x on AMX Xeons, and on CPUs without bf16
units a bf16 GEMM runs at ~1 GFLOP/s (0.01x fp32). So ``auto`` times a forward and backward of the
model's own shape in fp32 and under bf16 autocast (the kernels the model would really run, attention
included), and picks bf16 only where it is at least ``BF16_MIN_SPEEDUP`` times faster and its loss
agrees with fp32's. Where bf16 GEMMs alone are under half as fast as fp32 the model is not timed in
bf16 at all (a step would take minutes). The timings are cached per machine and model shape
(:mod:`lmforge.hardware`), so only the first run of a shape on a machine pays (the default model on 2 AVX2 cores:
5.8 s with the machine's GEMM figures, 0.2 s of it the model).

GPUs take bf16 where supported (fp16 with loss scaling otherwise) without a measurement.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.hardware import bf16_gemm_speedup, cached
from lmforge.model import build_model
from lmforge.runtime import BF16_MIN_SPEEDUP, resolve_precision

PROBE_SEQUENCES = 4
"""Sequences per timed step: the ratio of the precisions, not the step time, is what is measured."""


@dataclass
class PrecisionChoice:
    precision: str
    reason: str
    """Why, for the run header: ``measured bf16 1.82x fp32 on this model``, ``train.precision=bf16``."""


def time_train_step(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None,
                    repeats: int = 3) -> tuple[float, float]:
    """(seconds per forward+backward, the loss) of a fresh model of shape ``cfg`` on random tokens,
    the best of ``repeats`` after one warm-up; under autocast to ``dtype`` (None: fp32)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # the same weights and tokens for both precisions; the run's RNG is untouched
        model = build_model(cfg).to(device).eval()  # eval: no dropout masks drawn; backward works all the same
        idx = torch.randint(cfg.vocab_size, (PROBE_SEQUENCES, cfg.block_size + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]
        # An encoder-decoder reads a source and writes a target, each a block long (as its pretraining does).
        inputs = (x, x, y) if cfg.arch == "encoder_decoder" else (x, y)
        best, loss_value = math.inf, math.nan
        for i in range(repeats + 1):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                _, loss = model(*inputs)
            loss.backward()
            loss_value = loss.item()  # waits for the device
            if i:
                best = min(best, time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    return best, loss_value


def measure_precisions(cfg: ModelConfig, device: torch.device) -> dict:
    """{"fp32_s": ..., "bf16_s": ... or None, "bf16_gemm": ..., "loss_gap": ...} for this model on this CPU."""
    gemm = bf16_gemm_speedup(device)
    fp32_s, fp32_loss = time_train_step(cfg, device, None)
    out = {"fp32_s": fp32_s, "bf16_s": None, "bf16_gemm": gemm, "loss_gap": None}
    if gemm >= 0.5:
        bf16_s, bf16_loss = time_train_step(cfg, device, torch.bfloat16)
        out.update(bf16_s=bf16_s, loss_gap=abs(bf16_loss - fp32_loss) / max(abs(fp32_loss), 1e-6))
    return out


def decide(measured: dict) -> PrecisionChoice:
    """bf16 where it measured >= BF16_MIN_SPEEDUP x fp32's speed with a loss within 2% of fp32's, else fp32."""
    if measured["bf16_s"] is None:
        return PrecisionChoice("fp32", f"auto: bf16 GEMMs measured {measured['bf16_gemm']:.2g}x fp32 here")
    speedup = measured["fp32_s"] / measured["bf16_s"]
    if not (measured["loss_gap"] <= 0.02):  # also catches a NaN
        return PrecisionChoice("fp32", f"auto: bf16 measured {speedup:.2f}x fp32, but its loss differs by "
                                       f"{measured['loss_gap']:.1%}")
    precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return PrecisionChoice(precision, f"auto: bf16 measured {speedup:.2f}x fp32 on this model")


def choose_precision(asked: str, cfg: ModelConfig, device: torch.device, trained_in: str = "") -> PrecisionChoice:
    """The precision to train ``cfg`` in on ``device``: ``asked`` unless it is 'auto' (see the module doc). A resumed
    run ``trained_in`` a precision keeps it where the device can: measured again (with other threads, on a busier
    day) the choice could come out otherwise, and the resumed steps would not be the uninterrupted run's."""
    if asked == "auto" and trained_in:
        with contextlib.suppress(UserError):  # e.g. a GPU run's fp16 resumed on a CPU: decide afresh
            return PrecisionChoice(resolve_precision(trained_in, device), f"auto: {trained_in}, as the run trained")
    if asked != "auto":
        return PrecisionChoice(resolve_precision(asked, device), f"train.precision={asked}")
    if device.type != "cpu":
        return PrecisionChoice(resolve_precision("auto", device), f"auto: {device.type}")
    return decide(cached(device, "train step " + cfg.shape_key, lambda: measure_precisions(cfg, device)))
