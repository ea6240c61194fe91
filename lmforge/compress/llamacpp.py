"""llama.cpp's own verdict on a GGUF export, through llama-cpp-python (an optional extra: ``pip install
'lmforge[llamacpp]'``, which builds llama.cpp from source, ~7 minutes on 2 cores).

:func:`agreement` loads the file in llama.cpp and compares it with an lmforge model on the same texts: the token
ids of llama.cpp's own tokenizer, the warnings llama.cpp logs while loading (an unknown vocabulary or
pre-tokenizer is one), next-token logits at every position, and greedy continuations. ``lmforge export --format
gguf`` adds its summary to the report when llama-cpp-python is installed; tests/compress/test_llamacpp.py holds
the default model and a Llama preset to thresholds.

:func:`llama_decode_time` and :func:`lmforge_decode_time` time one batch-1 greedy generation in each, the same way
(the prompt in and the first token out, then every later token), for the export report's decode figure and
bench/decode_speed.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.generate import generate
from lmforge.model.gpt import GPT

if TYPE_CHECKING:
    import llama_cpp

TEXTS: tuple[str, ...] = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import os\nimport sys\n\n\nclass Config:\n    pass\n",
    "@decorator\nasync def handler(request: Request) -> Response:\n    await asyncio.sleep(0.1)\n",
    'if __name__ == "__main__":\n    main()\n',
    "x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares\n",
    "'''docstring''' \"quoted\" `ticks` {braces} [brackets] (parens) <angle> a->b a=>b a!=b",
    "        deeply_indented = True\n            more = None\n",
    "tabs\there\tand\there\n\tindented with a tab\n",
    "    \t  mixed    whitespace\t\truns   \n",
    "\n\n\n\nempty lines above\n\n\n",
    "   leading and trailing spaces   ",
    "  \n  \n  ",
    "Line with\r\nwindows newlines\r\n",
    "The quick brown fox's tail; they'll see, we've won, I'm here, you're there, she'd go, it's done.",
    "Ünïcödé: naïve café, Straße, smörgåsbord, Øresund",
    "日本語のテキストと中文字符、한국어도",
    "emoji 🙂🚀👩‍💻 and symbols ∑∫√ ≠ ≤ ≥ →",
    "Привет, мир! Γειά σου κόσμε! مرحبا",
    "1234567890 3.14159 -42 1e-10 0xFF 0b1010 1_000_000",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE __dunder__",
    "https://example.com/path?query=1&other=2#fragment user.name+tag@domain.co.uk",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "# -*- coding: utf-8 -*-\n#!/usr/bin/env python3\n",
    "",
)
"""Texts whose token ids must agree: code, whitespace runs, empty lines, contractions, unicode."""
GREEDY_PROMPTS: tuple[str, ...] = ("def ", "import os\n", "class Model:\n    def __init__(self", "for i in range(")
"""Prompts whose greedy continuations must agree."""


_WARN, _CONTINUED = 3, 5
"""ggml.h's GGML_LOG_LEVEL_WARN, and GGML_LOG_LEVEL_CONT: a line continuing the previous message."""


def available() -> bool:
    """Whether llama-cpp-python is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class Agreement:
    """How a GGUF file run by llama.cpp agrees with an lmforge model."""

    llama_cpp: str
    """llama-cpp-python's version."""
    texts: int
    tokenizer_equal: int
    """Texts whose llama.cpp token ids equal lmforge's."""
    tokenizer_mismatches: list[str]
    """The texts that differ (repr)."""
    warnings: list[str]
    """Warning lines llama.cpp logged while loading the file."""
    positions: int
    max_logit_diff: float
    """Largest |llama.cpp logit - lmforge logit| over every position of every text and the whole vocabulary."""
    top1_agreement: float
    """Share of positions where both pick the same most likely next token."""
    greedy_identical: int
    """Greedy continuations identical to lmforge's, out of ``greedy_prompts``."""
    greedy_prompts: int
    greedy_tokens: int
    greedy_first_difference: list[int] = field(default_factory=list)
    """For each prompt whose continuation differs, the index of the first differing token."""

    def summary(self) -> str:
        """One line for a report."""
        warned = f"{len(self.warnings)} load warnings ({self.warnings[0].strip()!r}, ...)" if self.warnings \
            else "no load warning"
        return (f"llama.cpp (llama-cpp-python {self.llama_cpp}): token ids equal on {self.tokenizer_equal}/"
                f"{self.texts} texts; {warned}; next-token logits within {self.max_logit_diff:.2g} of lmforge's "
                f"over {self.positions} positions, same top-1 at {self.top1_agreement:.1%}; greedy "
                f"{self.greedy_tokens}-token continuations identical for {self.greedy_identical}/{self.greedy_prompts}"
                f" prompts")


def agreement(path: str | Path, model: GPT, tokenizer: Tokenizer, *, texts: tuple[str, ...] = TEXTS,
              greedy_prompts: tuple[str, ...] = GREEDY_PROMPTS, greedy_tokens: int = 64,
              threads: int = 2) -> Agreement:
    """Run the GGUF file at ``path`` in llama.cpp and compare it with ``model`` (a float model on the CPU, in eval
    mode) and ``tokenizer``: the file's own tokenizer, logits at every position of ``texts`` (each cut to the model's
    context), and ``greedy_tokens`` greedy tokens after each of ``greedy_prompts``."""
    import llama_cpp
    from llama_cpp import _logger

    warnings: list[str] = []
    level = [0]

    @llama_cpp.llama_log_callback
    def keep_warnings(lvl: int, text: bytes, _: ctypes.c_void_p) -> None:
        level[0] = level[0] if lvl == _CONTINUED else lvl
        if level[0] == _WARN:
            warnings.append(text.decode("utf-8", "replace"))

    context = model.cfg.block_size
    llama_cpp.llama_log_set(keep_warnings, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                              logits_all=True, verbose=False)
        load_warnings = list(warnings)

        def logits(ids: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return llm.scores[:len(ids)].copy()

        mismatches, diffs, same, positions = [], [], 0, 0
        for text in texts:
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            ours = tokenizer.encode(text)
            if theirs != ours:
                mismatches.append(repr(text))
            ids = ours[:context]
            if not ids:
                continue
            with torch.no_grad():
                want = model(torch.tensor([ids]))[0][0].numpy()
            got = logits(ids)[:, :want.shape[-1]]
            diffs.append(float(np.abs(got - want).max()))
            same += int((got.argmax(-1) == want.argmax(-1)).sum())
            positions += len(ids)

        identical, first_difference = 0, []
        for prompt in greedy_prompts:
            ids = tokenizer.encode(prompt)
            n = min(greedy_tokens, context - len(ids))
            want = generate(model, [ids], n, temperature=0.0)[0]
            got = llama_decode_time(llm, ids, len(want)).tokens if want else []
            if got == want:
                identical += 1
            else:
                first_difference.append(next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b))
        llm.close()
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return Agreement(llama_cpp=llama_cpp.__version__, texts=len(texts), tokenizer_equal=len(texts) - len(mismatches),
                     tokenizer_mismatches=mismatches, warnings=load_warnings, positions=positions,
                     max_logit_diff=max(diffs), top1_agreement=same / positions, greedy_identical=identical,
                     greedy_prompts=len(greedy_prompts), greedy_tokens=greedy_tokens,
                     greedy_first_difference=first_difference)


@dataclass
class DecodeTime:
    """One batch-1 greedy generation, timed in two parts."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    """From the call to the first new token: the prompt evaluated, its last logits turned into a token."""
    decode_s: float
    """From the first new token to the last: ``new_tokens - 1`` single-token steps."""
    tokens: list[int]
    """The new tokens."""

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second."""
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (0 when only one was asked for)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole call, prefill included."""
        return self.new_tokens / (self.prefill_s + self.decode_s)


def open_llama(path: str | Path, n_ctx: int, threads: int) -> llama_cpp.Llama:
    """The GGUF file at ``path`` loaded in llama.cpp for batch-1 decoding on ``threads`` CPU threads (prompt and
    single tokens alike), its load log silenced."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def llama_decode_time(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int,
                      clock: Callable[[], float] = time.perf_counter) -> DecodeTime:
    """Greedy-decode ``new_tokens`` after ``prompt`` in llama.cpp (``llm`` from :func:`open_llama`, its context
    at least ``len(prompt) + new_tokens``), timed as :class:`DecodeTime` says. Each token is the argmax of
    llama.cpp's last logits, read in place: no sampler, no copy of the logits (which llama-cpp-python's own
    ``generate`` makes), so what is timed is llama.cpp's forward pass."""
    import llama_cpp

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    llm.reset()
    start = clock()
    llm.eval(prompt)
    tokens = [next_token()]
    first = clock()
    while len(tokens) < new_tokens:
        llm.eval(tokens[-1:])
        tokens.append(next_token())
    return DecodeTime(len(prompt), new_tokens, first - start, clock() - first, tokens)


def lmforge_decode_time(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                        clock: Callable[[], float] = time.perf_counter) -> DecodeTime:
    """Greedy-decode ``new_tokens`` after ``prompt`` with :func:`lmforge.generate.generate` (under whatever
    autocast the caller has entered), timed as :func:`llama_decode_time` times llama.cpp: the first new token's
    arrival (``on_token``) splits the prefill from the single-token steps."""
    first: list[float] = []

    def arrived(_row: int, _token: int) -> None:
        if not first:
            first.append(clock())

    start = clock()
    tokens = generate(model, [prompt], new_tokens, temperature=0.0, on_token=arrived)[0]
    end = clock()
    return DecodeTime(len(prompt), new_tokens, first[0] - start, end - first[0], tokens)
