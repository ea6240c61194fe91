"""Speculative decoding, batch 1, greedy: guess the next few tokens cheaply, check them all in one forward.

Each step proposes up to k tokens, from the text itself (prompt lookup: what followed the most recent earlier
occurrence of the text's last n tokens, as in Saxena's prompt-lookup decoding and Hugging Face's
``prompt_lookup_num_tokens``) or from a small draft model (k greedy steps, with its own static KV cache). The
model then runs once over the newest token and the k proposals. The proposals that match the model's own
greedy choices are kept, and the model's choice after the last kept one comes with them: 1 to k + 1 tokens for
one forward over k + 1 positions, every one of them the model's greedy choice, so the output is plain greedy
decoding's (up to near-ties, which a forward over several positions may round differently in the last bits).

The caches roll back by their write position alone: a static cache hands attention only its slots before the
end of each write (``KVCache.update``), so a rejected proposal's slots are never read, and the next write
overwrites them. A write of several tokens after the first slot needs an explicit causal mask (PyTorch's
``is_causal`` aligns a non-square mask to the top left, which would hide the cache from the new tokens).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.loading import LoadedRun, load_lm
from lmforge.model.gpt import GPT
from lmforge.options import GenerateOptions
from lmforge.runtime import eval_mode, maybe_compile

Decode = Callable[..., list[list[int]]]
"""A decoder with :func:`lmforge.generate.generate`'s signature."""


@dataclass
class SpeculativeStats:
    """What a speculative generation did: the model's forwards, the proposals and how many were kept."""

    steps: int = 0
    """Forwards of the model after the prompt's (each one checks a proposal, possibly empty)."""
    proposed: int = 0
    """Tokens proposed."""
    accepted: int = 0
    """Proposed tokens the model agreed with."""
    tokens: int = 0
    """New tokens decoded speculatively."""
    plain_tokens: int = 0
    """New tokens decoded plainly, past the point where the context would slide."""
    seconds: float = 0.0
    """Wall time of the speculative part, the prompt's forward included."""
    stopped: bool = False
    """The last generation ended at a stop id or because ``on_token`` said so (not at its token budget)."""

    def add(self, other: SpeculativeStats) -> None:
        """Count ``other``'s work in too (several prompts)."""
        for name in ("steps", "proposed", "accepted", "tokens", "plain_tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.stopped = other.stopped

    def summary(self) -> str:
        """One line: tokens per forward of the model, proposals kept, speed."""
        per_step = (self.tokens - 1) / self.steps if self.steps else 0.0  # the prompt's forward gives the first
        kept = f"{self.accepted}/{self.proposed} proposed tokens kept ({self.accepted / self.proposed:.0%})" \
            if self.proposed else "no token proposed"
        speed = f"{self.tokens / self.seconds:.1f} tok/s" if self.seconds > 0 else "-"
        plain = f"; {self.plain_tokens} more decoded plainly (past the context)" if self.plain_tokens else ""
        return (f"speculative: {self.tokens} tokens in {self.steps} model steps after the prompt "
                f"({per_step:.2f} a step), {kept}, {speed}{plain}")


class PromptLookup:
    """Proposes what followed the most recent earlier occurrence of the text's last n tokens, n from ``ngram``
    down to 1 (the longest match that occurred before wins; nothing if even the last token never did).

    An index from each n-gram to where the tokens after its latest occurrence start is updated as the text
    grows, so a proposal costs ``ngram`` dictionary lookups whatever the text's length.
    """

    def __init__(self, ngram: int):
        if ngram < 1:
            raise UserError(f"prompt lookup n-gram size: expected an integer of at least 1, got {ngram}")
        self.ngram = ngram
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 1  # the n-grams ending before seq[i] are in the index for every i < indexed

    def propose(self, seq: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``seq``."""
        for end in range(self.indexed, len(seq)):
            for n in range(1, min(self.ngram, end) + 1):
                self.index[tuple(seq[end - n:end])] = end
        self.indexed = max(self.indexed, len(seq))
        for n in range(min(self.ngram, len(seq)), 0, -1):
            start = self.index.get(tuple(seq[-n:]))
            if start is not None:
                return seq[start:start + k]
        return []

    def keep(self, n: int) -> None:
        """Nothing to roll back: only kept tokens are indexed."""


class DraftModel:
    """Proposes the greedy continuation of a small model that shares the vocabulary, one token per forward.

    Its static cache holds the first ``cached`` tokens of the text; each proposal first feeds what the cache
    lacks (the prompt at the first call, then the tokens kept since), then one forward per proposed token.
    """

    def __init__(self, model: GPT, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size
        self.cached = 0

    def propose(self, seq: list[int], k: int) -> list[int]:
        """``k`` tokens to follow ``seq``."""
        out: list[int] = []
        new = seq[self.cached:]
        while len(out) < k:
            logits = _forward(self.model, new, self.cached, last_only=True)
            self.cached += len(new)
            # A draft with a larger (padded) vocabulary must not propose an id the model lacks.
            out.append(int(logits[-1, :self.vocab_size].argmax()))
            new = out[-1:]
        return out

    def keep(self, n: int) -> None:
        """The text's first ``n`` tokens are what the cache was fed: the rest is stale."""
        self.cached = min(self.cached, n)


def _forward(model: GPT, ids: list[int], start: int, last_only: bool) -> torch.Tensor:
    """Logits (T or 1, V) for ``ids`` written into the cache at slot ``start`` (positions from ``start``)."""
    x = torch.tensor([ids], device=model.device)
    mask = None
    if len(ids) > 1 and start > 0:  # a single query sees every cached slot, and a prefill is square: causal
        q = torch.arange(start, start + len(ids), device=x.device)[:, None]
        mask = (torch.arange(start + len(ids), device=x.device)[None, :] <= q)[None, None]
    logits, _ = model(x, mask=mask, cache_start=start, last_only=last_only)
    return logits[0]


def context_limit(model: GPT, draft: GPT | None = None) -> int:
    """The most prompt + new tokens a speculative generation takes: the context of the model (and draft)."""
    return min(model.cfg.block_size, draft.cfg.block_size if draft is not None else model.cfg.block_size)


@torch.inference_mode()
def generate_speculative(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, *, draft: GPT | None = None,
                         lookup_ngram: int | None = None, num_draft_tokens: int = 4, stop_ids: Sequence[int] = (),
                         on_token: Callable[[int], bool | None] | None = None) -> tuple[list[int], SpeculativeStats]:
    """Greedy continuation of one prompt, by speculative decoding; returns the new tokens and what it took.

    Proposals come from the small model ``draft`` (same vocabulary) or, with ``lookup_ngram`` N, from prompt
    lookup with n-grams of N tokens down to 1 (exactly one of the two). ``num_draft_tokens`` is k, the most
    tokens proposed per step. The tokens are :func:`lmforge.generate.generate`'s at temperature 0: it stops after
    a token in ``stop_ids`` (left out) or ``max_new_tokens``; ``on_token(token_id)`` is called for each new
    token and returning True stops (the token stays). The prompt and the new tokens must fit the context
    (:func:`context_limit`) as they are: nothing slides (:func:`speculative_decoder` continues plainly past it).
    Runs in eval mode; under ``torch.autocast`` the caches hold the autocast dtype, as ``generate``'s does.
    """
    if (draft is None) == (lookup_ngram is None):
        raise UserError("speculative decoding needs one source of proposals: a draft model or a lookup n-gram size")
    if num_draft_tokens < 1:
        raise UserError(f"draft tokens: expected an integer of at least 1, got {num_draft_tokens}")
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token (e.g. the end-of-text id)")
    stats = SpeculativeStats()
    if max_new_tokens <= 0:
        return [], stats
    limit = context_limit(model, draft)
    if len(prompt_ids) + max_new_tokens > limit:
        raise UserError(f"a {len(prompt_ids)}-token prompt + {max_new_tokens} new tokens pass the context of "
                        f"{limit} tokens: speculative decoding needs them to fit (decode fewer tokens)")
    began = time.perf_counter()
    proposer = PromptLookup(lookup_ngram) if draft is None else DraftModel(draft, model.cfg.vocab_size)
    stop = set(stop_ids)
    seq, out = list(prompt_ids), []
    device = model.device
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # One spare slot keeps a cache from ever filling up, which torch.compile would treat as another case.
    slots = len(seq) + max_new_tokens + 1
    models = [model] if draft is None else [model, draft]
    try:
        for m in models:
            m.setup_cache(1, slots, cache_dtype)
        with eval_mode(model), eval_mode(draft) if draft is not None else contextlib.nullcontext():
            queue = [int(_forward(model, seq, 0, last_only=True)[-1].argmax())]
            cached = len(seq)  # the model's cache holds seq[:cached]: all but the newest token, once queued
            while True:
                for tok in queue:
                    if tok in stop:
                        stats.stopped = True
                        return out, stats
                    out.append(tok)
                    seq.append(tok)
                    if on_token is not None and on_token(tok):
                        stats.stopped = True
                        return out, stats
                    if len(out) == max_new_tokens:
                        return out, stats
                proposal = proposer.propose(seq, min(num_draft_tokens, max_new_tokens - len(out)))
                # The model's choice after the newest token, and after each proposed one.
                choices = _forward(model, seq[cached:] + proposal, cached, last_only=False).argmax(-1).tolist()
                n = 0
                while n < len(proposal) and proposal[n] == choices[n]:
                    n += 1
                queue = [*proposal[:n], choices[n]]
                cached = len(seq) + n
                proposer.keep(cached)
                stats.steps += 1
                stats.proposed += len(proposal)
                stats.accepted += n
    finally:
        for m in models:
            m.clear_cache()
        stats.tokens = len(out)
        stats.seconds = time.perf_counter() - began


def speculative_for(o: GenerateOptions, run: LoadedRun, model: GPT, device: torch.device, stats: SpeculativeStats,
                    fallback: Decode) -> Decode | None:
    """The decoder ``lmforge generate --lookup/--draft`` asks for (None: plain decoding), counting into ``stats``;
    a note on stderr when the sampling is not greedy, which only plain decoding does."""
    if o.lookup is None and o.draft is None:
        return None
    if o.sampling.temperature > 0 or o.sampling.repetition_penalty != 1.0:
        print("note: --lookup and --draft decode greedily only (-t 0, no --repetition-penalty): sampling decodes "
              "plainly", file=sys.stderr)
        return None
    draft = None
    if o.draft is not None:
        found = load_lm(o.draft, device, "lmforge generate --draft")
        if found.tokenizer.hf.get_vocab() != run.tokenizer.hf.get_vocab():
            raise UserError(f"--draft '{o.draft}' has another tokenizer than '{o.run}': a draft must share the "
                            f"model's (train it on the model's dataset: data.dataset_dir=...)")
        # In the model's precision (lmforge.inference chose it for the model: the draft is read the same way).
        draft = maybe_compile(found.model.to(model.dtype), o.compile, dynamic=True)
    return speculative_decoder(fallback, stats, draft=draft, lookup_ngram=o.lookup, num_draft_tokens=o.draft_tokens)


def speculative_decoder(fallback: Decode, stats: SpeculativeStats, *, draft: GPT | None = None,
                        lookup_ngram: int | None = None, num_draft_tokens: int = 4) -> Decode:
    """A decoder with ``generate``'s signature that continues each prompt in turn by :func:`generate_speculative`
    (greedy: the caller checks the sampling is) and adds what it did to ``stats``.

    Where prompt + new tokens would pass the context, the tokens up to one short of it are speculative, and
    ``fallback`` (``lmforge.generate.generate``) continues from there, prompt and tokens so far as its prompt:
    its window slides exactly where it would have, so the output stays plain greedy decoding's.
    """

    def decode(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
               on_token: Callable[[int, int], bool | None] | None = None, **sampling) -> list[list[int]]:
        outs = []
        for row, prompt in enumerate(prompts):
            def row_token(tok: int, row: int = row) -> bool | None:
                return on_token(row, tok) if on_token is not None else None

            fits = len(prompt) + max_new_tokens <= context_limit(model, draft)
            # Past the context, stop one slot short: the fallback keeps a prompt of up to block_size - 1 whole.
            n = max_new_tokens if fits else max(context_limit(model, draft) - 1 - len(prompt), 0)
            out, done = generate_speculative(model, prompt, n, draft=draft, lookup_ngram=lookup_ngram,
                                             num_draft_tokens=num_draft_tokens, stop_ids=stop_ids,
                                             on_token=row_token)
            stats.add(done)
            if not done.stopped and len(out) < max_new_tokens:
                more = fallback(model, [[*prompt, *out]], max_new_tokens - len(out), stop_ids=stop_ids,
                                on_token=lambda _, tok: row_token(tok), **sampling)[0]
                stats.plain_tokens += len(more)
                out += more
            outs.append(out)
        return outs

    return decode
