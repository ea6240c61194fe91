"""Quantized models (int8, int4 QuantLinears) under continuous batching: one batched step, the tokens of alone."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.generate import generate
from lmforge.model.quantized import QuantLinear, QuantSpec, quantize_model
from lmforge.options import GREEDY
from lmforge.runtime import Runtime
from lmforge.serve.engine import Engine, Finished, Job
from tests.fixtures import HANG_S, tiny_model


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_decodes_concurrent_requests_in_one_batch_with_the_tokens_of_each_alone(method):
    model = quantize_model(tiny_model("llama-mini", n_embd=64, n_head=2), QuantSpec(method, 32)).eval()
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 14)]
    outs: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emit(i: int):
        def on(event) -> None:
            if isinstance(event, Finished):
                done.release()
            else:
                outs[i].append(event.id)
        return on

    engine = Engine(model, Runtime(torch.device("cpu"), "fp32"), max_batch=4)
    for i, p in enumerate(prompts):  # all queued before the engine starts: admitted together, decoded together
        engine.submit(Job(p, 10, emit=emit(i), sampling=GREEDY))
    engine.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=HANG_S)
    finally:
        engine.stop()
    assert engine.peak_batch == len(prompts)
    assert outs == [generate(model, [p], 10, temperature=0.0)[0] for p in prompts]
