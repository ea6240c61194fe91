"""The precision a model decodes in (lmforge.inference): cast weights, chosen by timing decode steps."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import inference
from lmforge.model.quantized import QuantSpec, quantize_model
from lmforge.runtime import Runtime
from tests.fixtures import tiny_model

CPU = Runtime(torch.device("cpu"), "bf16")


def test_an_asked_precision_casts_the_weights_and_decodes_without_autocast():
    model, rt, how = inference.decode_setup(tiny_model("llama-tiny"), CPU, "bf16")
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rt.autocast_dtype is None and rt.device == CPU.device and how == "bf16 weights (--precision bf16)"
    model, rt, _ = inference.decode_setup(model, CPU, "fp32")
    assert model.dtype == torch.float32 and rt.autocast_dtype is None


@pytest.mark.parametrize("width, fp32_s, bf16_s, gemm, expected", [  # a width per case: its own cache entry
    (64, 1.5e-3, 1.0e-3, 2.7, "bf16"),   # bf16 decodes 1.5x faster: cast to bf16
    (96, 1.1e-3, 1.0e-3, 2.7, "fp32"),   # 1.1x: not worth bf16's rounding
    (128, 1.0e-3, None, 0.01, "fp32"),   # bf16 GEMMs far slower: bf16 not even timed
])
def test_auto_decides_by_timing_decode_steps_once_per_machine_and_shape(monkeypatch, width, fp32_s, bf16_s, gemm,
                                                                         expected):
    timed = []

    def fake_time(cfg, device, dtype, compiled=False, repeats=3):
        timed.append(dtype)
        return fp32_s if dtype == torch.float32 else bf16_s

    monkeypatch.setattr(inference, "time_decode", fake_time)
    monkeypatch.setattr(inference, "bf16_gemm_speedup", lambda device: gemm)
    cfg = tiny_model("llama-tiny", n_embd=width).cfg
    first = inference.decode_precision("auto", cfg, torch.device("cpu"))
    again = inference.decode_precision("auto", cfg, torch.device("cpu"))
    assert first == again and first[0] == expected
    assert timed == ([torch.float32, torch.bfloat16] if bf16_s else [torch.float32])  # the second call: cached
    assert "decoded" in first[1] if bf16_s else "GEMMs" in first[1]


def test_a_decode_to_be_compiled_is_timed_compiled_and_cached_apart_from_eager(monkeypatch):
    timed = []

    def fake_time(cfg, device, dtype, compiled=False, repeats=3):
        timed.append((dtype, compiled))
        # Eagerly bf16 gains nothing here; compiled (streamed weights) half the bytes pays.
        return 1.5e-3 if compiled and dtype == torch.float32 else 1.0e-3

    monkeypatch.setattr(inference, "time_decode", fake_time)
    monkeypatch.setattr(inference, "bf16_gemm_speedup", lambda device: 2.7)
    cfg = tiny_model("llama-tiny", n_embd=160).cfg
    assert inference.decode_precision("auto", cfg, torch.device("cpu"))[0] == "fp32"
    precision, why = inference.decode_precision("auto", cfg, torch.device("cpu"), compiled=True)
    assert precision == "bf16" and "compiled" in why
    assert timed == [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)]


def test_a_quantized_model_keeps_its_weights_and_the_commands_autocast():
    model = quantize_model(tiny_model("llama-tiny", n_embd=64), QuantSpec("int8"))
    same, rt, how = inference.decode_setup(model, CPU, "auto")
    assert same is model and rt is CPU and "quantized" in how


def test_the_decode_probe_times_a_real_model():
    seconds = inference.time_decode(tiny_model("llama-tiny").cfg, torch.device("cpu"), torch.float32, repeats=1)
    assert 0 < seconds < math.inf
