"""Sampling and decoding, gpt-fast style: prefill the prompts in one call, then one token per call
with a preallocated static KV cache.

Prompts of different lengths are left-padded so that every row writes its next token into the same
cache slot. Each row gets its own position ids (0 at its first real token) and an attention mask that
hides the pad slots, so a padded row computes what its prompt alone would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import torch

from lmforge.data.records import read_text_file
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.inference import decode_setup
from lmforge.loading import LoadedRun, run_template
from lmforge.model.gpt import GPT
from lmforge.options import GenerateOptions, Sampling
from lmforge.runtime import Runtime, compile_falls_back_to_eager, eval_mode, maybe_compile
from lmforge.speculative import SpeculativeStats, speculative_for


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize tokens already in the row (CTRL / Hugging Face convention).

    logits: (B, V); seen: (B, V) boolean, True where the token occurs in the row's prompt or output.
    A positive logit is divided by ``penalty`` and a negative one multiplied, so that for
    penalty > 1 a seen token always becomes less likely. Results stay finite (an extreme penalty
    would otherwise overflow to inf, and sampling from inf gives NaN).
    """
    finfo = torch.finfo(logits.dtype)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(finfo.min, finfo.max)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from next-token logits (B, V).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to
    the ``top_k`` most likely tokens, then to the nucleus (the smallest set of most likely tokens
    whose probability mass reaches ``top_p``, at least one token), and sampled with ``generator``.
    """
    if temperature <= torch.finfo(logits.dtype).tiny:  # 0, or too small to divide by in this dtype: greedy
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    ids = None  # vocabulary ids of the candidates, when they are a sorted subset
    if top_k is not None and top_k < logits.shape[-1]:
        # Continuing with just the k candidates (sorted by topk) keeps top-p's sort small.
        logits, ids = torch.topk(logits, top_k, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        if ids is None:
            probs, ids = probs.sort(dim=-1, descending=True)
        # Drop a candidate once the mass before it already reaches top_p; the most likely one always
        # stays (a top_p below the dtype's resolution would otherwise drop every candidate).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        probs = probs.masked_fill(drop, 0.0)
    # multinomial renormalizes, so the cut distributions need no division by their mass.
    choice = torch.multinomial(probs, 1, generator=generator)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def _attention_mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(B, 1, end - start, end) mask for query slots [start, end) over key slots [0, end).

    Causal and blind to pad slots. Every slot also sees itself, so a pad query (whose output is
    discarded) never has an all-masked row: some attention kernels (and PyTorch before 2.5) give NaN
    there, which would reach real rows through the pad slots' values in the next layer.
    """
    q = torch.arange(start, end, device=valid.device)[:, None]
    k = torch.arange(end, device=valid.device)[None, :]
    return ((k <= q) & valid[:, None, None, :end]) | (k == q)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             seed: int | None = None, stop_ids: Sequence[int] = (), use_cache: bool = True,
             pad_id: int = 0, on_token: Callable[[int, int], bool | None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each row.

    A row stops after it samples one of ``stop_ids`` (not included in its output) or after
    ``max_new_tokens``; the loop ends when every row has stopped. Sampling: repetition penalty,
    then temperature (0 = greedy), top-k, top-p (see :func:`sample_next`), seeded by ``seed``: the
    fields of :class:`~lmforge.options.Sampling`, which checks them (:func:`generate_text` takes one).

    The context is ``model.cfg.block_size``: a longer prompt keeps its last block_size - 1 tokens
    (with a warning). Past the context the window slides, as nanoGPT's cropping does: once the
    window would hold block_size + 1 tokens it restarts at the last block_size - 1 of them, which
    are prefilled again (their positions change), so the model sees the last block_size - 1 to
    block_size tokens (one warning says so). The window counts the slots of the left-padded batch,
    so after a slide a shorter prompt's row may differ from its result alone.

    on_token(row, token_id) is called for each new token as it is produced (streaming); returning
    True stops that row (the token stays in its output). use_cache=False recomputes the whole
    sequence every step: slow, the reference the KV cache path is tested against. Runs in eval mode
    on the model's device and dtype; wrap the call in ``torch.autocast`` for mixed precision.
    ``model`` may be ``torch.compile(gpt, dynamic=True)``: one graph then serves every step.
    """
    Sampling(temperature, top_k, top_p, repetition_penalty, seed)  # OptionError naming a value that cannot work
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text id)")
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    block = model.cfg.block_size
    keep = max(block - 1, 1)  # the tokens a prompt keeps and a slid window restarts with
    prompts = _fit_context(prompts, keep)
    B, L = len(prompts), max(len(p) for p in prompts)
    S = L + max_new_tokens  # slots: the padded prompts, then the new tokens
    if block < S:
        # stacklevel 3: past torch.inference_mode's wrapper, to the caller.
        warnings.warn(f"a {L}-token prompt + {max_new_tokens} new tokens pass the model's context of {block} tokens: "
                      f"beyond it the window slides, and the model sees only the last {keep} to {block} tokens",
                      stacklevel=3)

    device = model.device
    tokens = torch.tensor([[pad_id] * (L - len(p)) + p + [pad_id] * max_new_tokens for p in prompts],
                          device=device)
    n_pad = torch.tensor([L - len(p) for p in prompts], device=device)
    slots = torch.arange(S, device=device)
    valid = slots >= n_pad[:, None]  # (B, S): which slots hold real tokens
    seen = None
    if repetition_penalty != 1.0:
        # One spare column absorbs the pad slots, so that pad_id is not counted as seen.
        seen = torch.zeros(B, model.cfg.vocab_size + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens[:, :L].masked_fill(~valid[:, :L], model.cfg.vocab_size), True)
        seen = seen[:, :-1]
    generator = seeded_generator(device, seed)

    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    # Under autocast the keys/values come out in the autocast dtype: the cache stores them so.
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # The model sees the slots [first, end); the cache holds [first, cached), cache slot 0 = slot first.
    first = cached = 0
    origin = n_pad[:, None]  # the slot of each row's position 0
    # Equal lengths need no mask, which lets attention use its fused causal kernels. A mask stays on
    # after the pads slide out of the window: switching would cost torch.compile another graph.
    padded = bool(n_pad.any())
    # A window holds at most block slots; one spare keeps the cache from ever filling up, which
    # torch.compile would treat as a special case (one more graph).
    with eval_mode(model), _static_kv_cache(model, B, min(S, block + 1), cache_dtype, enabled=use_cache):
        for end in range(L, S):
            if end - first > block:
                # Slide: every kept token's position changes, so the cache is refilled from the window.
                first = cached = end - keep
                origin = n_pad.clamp(min=first)[:, None]
            # With the cache, only the newest token goes in after a prefill; without it, the whole window.
            start = cached if use_cache else first
            logits, _ = model(tokens[:, start:end], positions=(slots[start:end] - origin).clamp(min=0),
                              mask=_attention_mask(valid[:, first:], start - first, end - first) if padded else None,
                              cache_start=start - first if use_cache else None, last_only=True)
            cached = end
            logits = logits[:, -1].float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            tokens[:, end] = nxt
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            if record_tokens(nxt.tolist(), out, done, stop, on_token):
                break
    return out


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The sampling generator on ``device``: seeded with ``seed``, or freshly (None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def record_tokens(new: list[int], out: list[list[int]], done: list[bool], stop: set[int],
                  on_token: Callable[[int, int], bool | None] | None) -> bool:
    """Append each row's new token to its output, unless the row is done; a stop id (not kept) or ``on_token``
    returning True ends the row. True once every row is done.

    Finished rows keep decoding (the batch shape is fixed) but their tokens are ignored here.
    """
    for row, tok in enumerate(new):
        if done[row]:
            continue
        if tok in stop:
            done[row] = True
            continue
        out[row].append(tok)
        if on_token is not None and on_token(row, tok):
            done[row] = True
    return all(done)


@contextlib.contextmanager
def _static_kv_cache(model: GPT, batch: int, max_len: int, dtype: torch.dtype | None,
                     enabled: bool) -> Iterator[None]:
    """The model's preallocated KV cache for the block (nothing if not ``enabled``), freed afterwards."""
    if not enabled:
        yield
        return
    model.setup_cache(batch, max_len, dtype)
    try:
        yield
    finally:
        model.clear_cache()


def _fit_context(prompts: list[list[int]], limit: int) -> list[list[int]]:
    """The last ``limit`` tokens of each prompt, warning for each one that loses any."""
    for i, p in enumerate(prompts):
        if len(p) > limit:
            # stacklevel 4: past generate and torch.inference_mode's wrapper, to generate's caller.
            warnings.warn(f"prompt {i} has {len(p)} tokens but the context leaves room for {limit}: "
                          f"dropped its first {len(p) - limit} tokens", stacklevel=4)
    return [list(p[-limit:]) for p in prompts]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the first stop string occurring in ``text`` starts, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


def _failure(stop: str) -> list[int]:
    """Knuth-Morris-Pratt's failure function: f[i] is the length of the longest proper prefix of stop[:i + 1]
    that is also a suffix of it."""
    f = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = f[k - 1]
        if stop[i] == stop[k]:
            k += 1
        f[i] = k
    return f


class StopPrefixes:
    """How much of the end of a growing text could still become a stop string: the longest end of the text that
    is the beginning of one of them.

    Each stop string has a Knuth-Morris-Pratt matcher fed only the characters added since the last call, so
    watching a text costs time linear in its length (testing every prefix of every stop string at every token costs
    the square of the stop strings' length per token). Should the text change behind what was fed (a decoder that
    rewrites earlier text), the matchers start again from its last characters.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.failures = [_failure(s) for s in self.stops]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.states = [0] * len(self.stops)
        self.text = ""

    def held(self, text: str) -> int:
        """Length of the longest end of ``text`` that could still grow into a stop string (0 to len - 1 of it)."""
        if not self.stops:
            return 0
        if text.startswith(self.text):
            new = text[len(self.text):]
        else:  # only the last longest - 1 characters can be the beginning of a stop string
            self.states = [0] * len(self.stops)
            new = text[-(self.longest - 1):] if self.longest > 1 else ""
        self.text = text
        for i, (stop, failure) in enumerate(zip(self.stops, self.failures, strict=True)):
            k = self.states[i]
            for c in new:
                if k == len(stop):  # a whole match last time: continue from its longest proper border
                    k = failure[k - 1]
                while k and c != stop[k]:
                    k = failure[k - 1]
                if c == stop[k]:
                    k += 1
            self.states[i] = k
        # A whole stop string at the end (find_stop's case) still holds back its longest proper border.
        return max(k if k < len(stop) else failure[k - 1]
                   for k, stop, failure in zip(self.states, self.stops, self.failures, strict=True))


class TextStream:
    """Generated tokens as text that is safe to show as it comes (``generate``'s stream, the server's): never half a
    UTF-8 character, never text that may turn out to begin a stop string; ``stopped`` once a stop string appeared
    (the text ends before it)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.prefixes = StopPrefixes(stop)
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        """The text that ``tok`` makes safe to show (often empty)."""
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)  # the whole text: a token may complete a character begun earlier
        cut = find_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            ready = cut
        elif text.endswith("\ufffd"):
            return ""
        else:
            ready = len(text) - self.prefixes.held(text)
        piece, self.sent = text[self.sent:ready], max(self.sent, ready)
        return piece

    def rest(self) -> str:
        """What was held back, once generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


def generate_text(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
                  sampling: Sampling, *, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = (),
                  stream: TextIO | None = None, allow_special: bool = False,
                  decode: Callable[..., list[list[int]]] | None = None) -> list[str]:
    """Continue each text prompt; returns the continuations (prompt excluded).

    An empty prompt starts a new document (the end-of-text token). Tokens are drawn as ``sampling``
    says (:data:`lmforge.options.GREEDY`: the most likely one). Generation stops at the tokenizer's
    end-of-text id, any of ``stop_ids``, or a stop string (the text is cut before it).

    allow_special: special tokens spelled in a prompt become their ids (chat-template prompts).
    stream: with one prompt, the continuation is written as it is generated (never a half UTF-8
    character, nor text that may turn out to start a stop string); with several, each finished
    continuation is written at the end, separated by a line ``----``.
    decode: what turns token ids into new ones, with :func:`generate`'s signature (default: it; speculative
    decoding: :func:`lmforge.speculative.speculative_decoder`).
    """
    encode = (lambda text: tokenizer.encode(text, allow_special=True)) if allow_special else tokenizer.encode
    ids = [encode(p) or [tokenizer.eot_id] for p in prompts]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens, sampling, stop_strings=stop_strings,
                             stop_ids=stop_ids, stream=stream, decode=decode or generate)


def generate_from_ids(model: torch.nn.Module, tokenizer: Tokenizer, inputs: list[list[int]], max_new_tokens: int,
                      sampling: Sampling, *, stop_strings: Sequence[str], stop_ids: Sequence[int],
                      stream: TextIO | None, decode: Callable[..., list[list[int]]]) -> list[str]:
    """:func:`generate_text` from the token ids of its inputs on: ``decode`` (with :func:`generate`'s signature)
    writes new tokens for each input, which come back as texts, cut at stop strings, and streamed as it says (an
    encoder-decoder's sources, framed, take this path too: :func:`lmforge.generate_seq2seq.generate_targets`)."""
    stop_ids = {tokenizer.eot_id, *stop_ids}
    live = TextStream(tokenizer, list(stop_strings)) if stream is not None and len(inputs) == 1 else None
    new_ids: list[list[int]] = [[] for _ in inputs]

    def on_token(row: int, tok: int) -> bool:
        if live is not None:
            piece = live.push(tok)
            if piece:
                stream.write(piece)
                stream.flush()
            return live.stopped
        new_ids[row].append(tok)
        # Decode the whole continuation: a token may complete a multi-byte character begun earlier.
        return find_stop(tokenizer.decode(new_ids[row]), stop_strings) is not None

    needs_callback = live is not None or bool(stop_strings)
    outs = decode(model, inputs, max_new_tokens, stop_ids=stop_ids, on_token=on_token if needs_callback else None,
                  **dataclasses.asdict(sampling))
    texts = []
    for out in outs:
        text = tokenizer.decode(out)
        cut = find_stop(text, stop_strings)
        texts.append(text if cut is None else text[:cut])
    if live is not None:
        # What was held back (a possible stop string start that never completed, a final partial char).
        rest = live.rest()
        if rest:
            stream.write(rest)
            stream.flush()
    elif stream is not None:
        stream.write("\n----\n".join(texts) + "\n")
        stream.flush()
    return texts


def blank_note(text: str, sampling: Sampling, chat: bool) -> str | None:
    """What to tell the user about a blank reply (``chat``) or continuation, else None: an empty one is the model
    ending its turn (or the text) at once, which looks like the command did nothing."""
    if text.strip():
        return None
    if text:
        what = f"the model's {'reply' if chat else 'continuation'} is only whitespace"
    elif chat:
        what = "the model ended its turn at once: no reply"
    else:
        what = "the model ended the text at once: no continuation"
    tip = "try sampling with -t 0.8" if sampling.temperature == 0 else "try another --seed"
    return f"{what}; {tip}, or more training"


def read_prompts(o: GenerateOptions) -> list[str]:
    """``lmforge generate``'s prompts: the --prompt ones, then the lines of --prompt-file (blank ones skipped)."""
    prompts = list(o.prompt)
    if o.prompt_file:
        prompts += [line for line in read_text_file(o.prompt_file, "--prompt-file").splitlines() if line.strip()]
    return prompts


def continue_command(o: GenerateOptions, prompts: list[str], run: LoadedRun, rt: Runtime) -> None:
    """``lmforge generate`` on a decoder-only run: continue the prompts (a single one streamed as it comes), print
    the texts. (The command itself, which loads the run and picks this or an encoder-decoder's path, is
    :func:`lmforge.generate_seq2seq.generate_command`.)"""
    prompts = prompts or [""]  # none: one empty prompt starts a new document
    # Weights in the precision that measured fastest at decoding (lmforge.inference), not autocast.
    if o.compile:
        compile_falls_back_to_eager()
    run.model, rt, _ = decode_setup(run.model, rt, o.precision, compiled=o.compile)
    model = maybe_compile(run.model, o.compile, dynamic=True)
    # What stdout shows before each continuation: a plain prompt (the continuation carries it on); with
    # --chat, not the rendered template: nothing before a streamed answer, the user's text in a batch.
    shown = [p + "\n" for p in prompts] if o.chat else list(prompts)
    stop_ids: list[int] = []
    if o.chat:
        template = run_template(o.run, run)
        prompts = [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        stop_ids = template.stop_ids
    stats = SpeculativeStats()
    decode = speculative_for(o, run, model, rt.device, stats, fallback=generate)
    if len(prompts) == 1 and not o.chat:  # the continuation streams right after its prompt
        print(prompts[0], end="", flush=True)
    with rt.autocast():
        texts = generate_text(model, run.tokenizer, prompts, o.max_new_tokens, o.sampling, stop_strings=o.stop,
                              stop_ids=stop_ids, stream=sys.stdout if len(prompts) == 1 else None,
                              allow_special=o.chat, decode=decode)
    notes = [blank_note(text, o.sampling, o.chat) for text in texts]
    if len(prompts) == 1:
        print(flush=True)
        if notes[0]:
            print(f"({notes[0]})", file=sys.stderr)
    else:
        for prompt, text in zip(shown, texts, strict=True):
            print(f"{prompt}{text}\n----", flush=True)
        for i, note in enumerate(notes):
            if note:
                print(f"(prompt {i + 1}: {note})", file=sys.stderr)
    if decode is not None:
        print(f"({stats.summary()})", file=sys.stderr)
