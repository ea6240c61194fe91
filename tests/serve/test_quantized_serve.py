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


# bf16: serve's precision on a CPU with bf16 (auto), where the integer kernels' float32 keys/values go into a bf16
# cache at each row's own slot (a dtype that indexed assignment does not cast by itself).
@pytest.mark.parametrize("method, precision", [("int8", "bf16"), ("int4", "bf16"), ("int8", "fp32")])
def test_a_quantized_model_decodes_concurrent_requests_in_one_batch_with_the_tokens_of_each_alone(method, precision):
    model = quantize_model(tiny_model("llama-mini", n_embd=64, n_head=2), QuantSpec(method, 32)).eval()
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1)]
    outs: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emit(i: int):
        def on(event) -> None:
            if isinstance(event, Finished):
                done.release()
            else:
                outs[i].append(event.id)
        return on

    rt = Runtime(torch.device("cpu"), precision)
    engine = Engine(model, rt, max_batch=3)
    for i, p in enumerate(prompts):  # all queued before the engine starts: admitted together, decoded together
        engine.submit(Job(p, 8, emit=emit(i), sampling=GREEDY))
    engine.start()
    try:
        for _ in prompts:
            assert done.acquire(timeout=HANG_S)
    finally:
        engine.stop()
    assert engine.peak_batch == len(prompts)
    with torch.inference_mode(), rt.autocast():
        assert outs == [generate(model, [p], 8, temperature=0.0)[0] for p in prompts]
