"""The precision a loaded model decodes in, chosen by timing *decoding* (``--precision auto`` of generate, chat and
serve), and the model's weights stored in it.

Decoding one token at a time reads every weight once per token: a batch-1 decode step is matrix-vector products
and per-layer overhead, not the large GEMMs whose bf16 speed-up the training precision and MFU peak measure (~2.7x
fp32 on a 2-core EPYC with AVX512-BF16). Its gain from bf16 weights differs by model: 1.40x for the default
4x4x256 model, 1.02x for llama-small, 1.72x for the 124M Llama shape, on that EPYC (best of 3 of 16 steps each,
medians of 3, the machine lightly loaded). So ``auto`` on a CPU times batch-1 greedy decode steps of the model's own
shape with its weights in fp32 and in bf16, and casts the weights to bf16 only where that measured at least
``BF16_MIN_SPEEDUP`` times faster. The timing is cached per machine and model shape (:mod:`lmforge.hardware`).
A decode that will be compiled (``--compile``) is timed compiled: compiled, a step streams its weights
(:class:`lmforge.model.gpt.Linear`), and half the bytes pays more (the first such probe of a shape compiles twice).

The weights are *cast*, not run under autocast: autocast re-casts every weight at every step, which on a CPU made
batch-1 decoding ~1.7x slower than casting once (bench/generate_speed.py). GPUs take bf16 (fp16 where bf16 is not
supported) without a measurement. A quantized model keeps its integer weights (their kernels pick their own
activation precision) and the command's autocast, as before.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from lmforge.config import ModelConfig
from lmforge.hardware import bf16_gemm_speedup, cached
from lmforge.model.gpt import GPT
from lmforge.model.quantized import is_quantized, prepare
from lmforge.runtime import BF16_MIN_SPEEDUP, Runtime, maybe_compile, resolve_precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_PROMPT, PROBE_TOKENS = 16, 16
"""Prompt tokens prefilled, then decode steps timed, per measurement (capped by the model's context)."""


def time_decode(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, compiled: bool = False,
                repeats: int = 3) -> float:
    """Seconds per token of batch-1 greedy decoding (one token per forward, static KV cache) by a fresh model of
    shape ``cfg`` with its weights in ``dtype``, torch.compiled as generate compiles it if ``compiled``: the best
    of ``repeats`` after a warm-up (which compiles)."""
    prompt_len = max(1, min(PROBE_PROMPT, cfg.block_size // 2))
    steps = max(1, min(PROBE_TOKENS, cfg.block_size - prompt_len - 1))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # the same weights for both precisions; the caller's RNG is untouched
        model = GPT(cfg).to(device=device, dtype=dtype).eval()
    step = maybe_compile(model, compiled, dynamic=True)
    best = math.inf
    with torch.inference_mode():  # as generate runs (a tensor made outside would be another graph)
        prompt = torch.arange(1, prompt_len + 1, device=device)[None] % cfg.vocab_size
        for i in range(repeats + 1):
            model.setup_cache(1, prompt_len + steps + 1, dtype)
            logits, _ = step(prompt, cache_start=0, last_only=True)
            token = logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for i_step in range(steps):
                logits, _ = step(token, cache_start=prompt_len + i_step, last_only=True)
                token = logits[:, -1].argmax(-1, keepdim=True)
            token.item()  # waits for the device
            if i:
                best = min(best, (time.perf_counter() - t) / steps)
            model.clear_cache()
    if compiled:
        # Its graphs stay in the inductor's disk cache (the model to decode compiles the same ones from it); dynamo's
        # in-memory entries would only count against its recompile limit.
        torch._dynamo.reset()
    return best


def measure_decode(cfg: ModelConfig, device: torch.device, compiled: bool = False) -> dict:
    """{"fp32_s": ..., "bf16_s": ... or None, "bf16_gemm": ...}: seconds per decoded token in each precision. bf16 is
    not timed where its GEMMs run under half fp32's speed (CPUs without bf16 units: a probe would take minutes)."""
    gemm = bf16_gemm_speedup(device)
    out = {"fp32_s": time_decode(cfg, device, torch.float32, compiled), "bf16_s": None, "bf16_gemm": gemm}
    if gemm >= 0.5:
        out["bf16_s"] = time_decode(cfg, device, torch.bfloat16, compiled)
    return out


def decode_precision(asked: str, cfg: ModelConfig, device: torch.device, compiled: bool = False) -> tuple[str, str]:
    """(precision, why) for decoding a model of shape ``cfg`` on ``device`` (torch.compiled if ``compiled``):
    ``asked`` unless it is 'auto'."""
    if asked != "auto":
        return resolve_precision(asked, device), f"--precision {asked}"
    if device.type != "cpu":
        return resolve_precision("auto", device), f"auto: {device.type}"
    key = "decode step " + cfg.shape_key + (" compiled" if compiled else "")
    measured = cached(device, key, lambda: measure_decode(cfg, device, compiled))
    if measured["bf16_s"] is None:
        return "fp32", f"auto: bf16 GEMMs measured {measured['bf16_gemm']:.2g}x fp32 here"
    speedup = measured["fp32_s"] / measured["bf16_s"]
    precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    how = "compiled " if compiled else ""
    return precision, f"auto: bf16 decoded {speedup:.2f}x fp32's speed {how}on this model"


def decode_setup(model: GPT, rt: Runtime, asked: str, compiled: bool = False) -> tuple[GPT, Runtime, str]:
    """``model`` ready to decode on ``rt.device``: (the model with its weights in the chosen precision, the runtime
    to decode under — without autocast, as the weights already are in that precision —, why that precision).

    asked: the command's ``--precision`` ('auto' measures, see the module doc). compiled: the command will
    torch.compile the model (``--compile``), so 'auto' times compiled steps. A quantized model comes back as it
    is, with ``rt`` (its autocast) unchanged.
    """
    if is_quantized(model):
        prepare(model, rt.device)
        return model, rt, f"{rt.precision} (quantized weights)"
    precision, why = decode_precision(asked, model.cfg, rt.device, compiled)
    return model.to(DTYPES[precision]), dataclasses.replace(rt, precision="fp32"), f"{precision} weights ({why})"
