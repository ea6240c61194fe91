"""lm-evaluation-harness adapter: ``lm_eval --model lmforge --model_args path=RUN_DIR --tasks ...``.

The three request types run on lmforge's own code: ``loglikelihood`` and ``loglikelihood_rolling``
on :mod:`lmforge.evaluate.tasks` and :mod:`lmforge.evaluate.lm` (so they equal ``lmforge eval``'s
numbers), ``generate_until`` on the KV-cache generator, batched.

Importing this module registers the model name ``lmforge`` with lm-eval (from Python). From the
command line, lm-eval finds it one way per install type: a regular install's
``lmforge-lm-eval.pth`` (see :mod:`lmforge._lm_eval_hook`), or ``lmforge lm-eval`` in an
editable install (README, "CLI reference").
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: it loads them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.evaluate import lm, tasks
from lmforge.generate import generate_text
from lmforge.loading import load_lm
from lmforge.options import Sampling
from lmforge.runtime import setup_runtime


@register_model("lmforge")
class LMForgeLM(LM):
    """An lmforge run (or checkpoint, or Hugging Face folder) as an lm-eval model."""

    def __init__(self, path: str, batch_size: int | str = 8, device: str = "auto", precision: str = "auto",
                 max_gen_toks: int = 256, **_: Any):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda by default
        self.rt = setup_runtime(device, precision)
        self.run = load_lm(path, self.rt.device, "lm-eval")
        self.model, self.tok = self.run.model, self.run.tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tasks.split_encode(self.tok, context, continuation) for context, continuation in
                 (r.args for r in requests)]
        with self.rt.autocast():
            return tasks.loglikelihoods(self.model, pairs, self.batch_size, self.rt.device)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for (text, *_) in (r.args for r in requests):
            score = lm.score_texts(self.model, self.tok, iter([("request", iter([text]))]),
                                   batch_size=self.batch_size, device=self.rt.device, autocast=self.rt.autocast)
            out.append(-score.nll)
        return out

    def generate_until(self, requests) -> list[str]:
        """Requests with the same settings are generated together, ``batch_size`` prompts at a time."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            sample = bool(kwargs.get("do_sample", False))
            key = (until, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                   float(kwargs.get("temperature", 1.0)) if sample else 0.0, kwargs.get("top_k"), kwargs.get("top_p"))
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature, top_k, top_p), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                with self.rt.autocast():
                    texts = generate_text(self.model, self.tok, [requests[i].args[0] for i in chunk], max_new,
                                          Sampling(temperature, top_k, top_p), stop_strings=until)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
        return out
