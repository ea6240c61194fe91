"""The prefix cache: prompts that begin with stored blocks reuse their keys/values and sample the same tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.errors import UserError
from lmforge.options import GREEDY
from lmforge.runtime import Runtime
from lmforge.serve.engine import BLOCK, Engine, Finished, Job, PrefixCache
from lmforge.serve.options import ServeOptions
from tests.fixtures import HANG_S, tiny_model


def run_one(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens of one job, run to its end."""
    out: list[int] = []
    done = threading.Event()

    def emit(event) -> None:
        if isinstance(event, Finished):
            done.set()
        else:
            out.append(event.id)

    engine.submit(Job(prompt, max_tokens, emit=emit, sampling=GREEDY))
    assert done.wait(HANG_S)
    return out


def chat(engine: Engine, system: list[int], turns: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    """Requests one after another: a shared system prompt with each user turn, then one conversation re-sent each
    turn with the answers so far. Their outputs, and the prompt tokens the engine reused."""
    engine.start()
    try:
        outs = [run_one(engine, system + turn, max_tokens) for turn in turns]
        history = list(system)
        for turn in turns:
            history += turn
            outs.append(run_one(engine, history, max_tokens))
            history += outs[-1]
    finally:
        engine.stop()
    assert engine.stats()["reused_tokens"] == engine.reused_tokens
    return outs, engine.reused_tokens


def test_prompts_sharing_a_prefix_reuse_it_and_sample_the_tokens_of_a_full_prefill():
    model = tiny_model("llama-mini", block_size=256)  # RoPE: the positions of the rest must follow the prefix's
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, 97, (40,), generator=g).tolist()
    turns = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 1)]
    rt = Runtime(torch.device("cpu"), "fp32")
    plain, reused_plain = chat(Engine(model, rt, max_batch=2), system, turns, 12)
    cached, reused = chat(Engine(model, rt, max_batch=2, prefix_cache_mib=1), system, turns, 12)
    assert cached == plain
    assert reused_plain == 0
    # Whole blocks of 16, at most all the prompt's tokens but the last; a finished job leaves its prompt and its
    # answer but the last token (12 - 1). System + turn: 45, 57, 41 tokens: 0, then the system prompt's 2 blocks
    # twice. The conversation: 45 tokens (2 blocks), 45 + 12 + 17 = 74 (the 45 + 11 of the one before: 3 blocks),
    # 74 + 12 + 1 = 87 (74 + 11: 5 blocks).
    assert reused == (0 + 2 + 2) * BLOCK + (2 + 3 + 5) * BLOCK


def test_the_prefix_cache_keeps_to_its_budget_and_evicts_the_least_recently_used_leaf_first():
    block_kv = torch.zeros(1, 2, 1, BLOCK, 4)  # one block: 2 * 16 * 4 floats = 512 bytes
    size = block_kv.element_size() * block_kv.numel()
    cache = PrefixCache(3 * size)

    def kv_of(a: int, b: int) -> torch.Tensor:
        return torch.arange(a, b, dtype=torch.float32)[None, None, None, :, None].expand(1, 2, 1, b - a, 4)

    a, b = [1] * BLOCK, [2] * BLOCK
    cache.insert(a + a + [9], kv_of)  # two blocks (the last token is no whole block)
    assert [len(c) for c in (cache.match(a + a + a, 48), cache.match(a + b, 32), cache.match(a + a, 31))] == [2, 1, 1]
    cache.insert(b + b, kv_of)  # the budget holds 3: the oldest leaf (a's second block) goes
    assert cache.used == 3 * size
    assert len(cache.match(a + a, 32)) == 1 and len(cache.match(b + b, 32)) == 2
    assert torch.equal(PrefixCache.load(cache.match(b + b, 32))[0, 0, 0, :, 0], torch.arange(32.0))


def test_the_prefix_cache_option_takes_a_size_in_mib():
    assert ServeOptions("run").prefix_cache_mib > 0
    with pytest.raises(UserError, match="prefix_cache_mib"):
        ServeOptions("run", prefix_cache_mib=-1)
