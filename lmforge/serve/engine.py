"""Continuous batching: one thread owns the model and serves every request from one running batch.

Each request is a :class:`Job`: a prompt (token ids) and its sampling settings. The engine keeps up to
``max_batch`` jobs running in the rows of one static KV cache (a row per job, ``block_size`` slots each) and
at most ``max_queue`` waiting. Between two decode steps it admits waiting jobs into free rows: each is
prefilled alone (its prompt in one forward, written into its own cache row) and samples its first token.
A decode step then feeds every running row its last token at its own position, each written at its own
cache slot (``KVCache.update`` with a tensor of slots) under a mask that shows each row its own slots only.
A job that finishes (a stop token, ``max_tokens``, or cancelled: its client went away, or a stop string was
found) leaves at once: the last running row moves into its place, so the running rows stay the first ones
of the cache and a step computes nothing for free rows.

With a prefix cache (:class:`PrefixCache`, ``prefix_cache_mib`` > 0) a prefill starts where the longest stored
prefix of the prompt ends: the keys/values of prompts (and of finished jobs' outputs) are kept in blocks of
:data:`BLOCK` tokens, and a new prompt that begins with stored blocks gets them copied into its row and prefills
only the rest (at least its last token, whose logits give the first sampled token). The keys/values of a prefix at
positions 0..n-1 do not depend on what follows it, so the tokens are those of a full prefill (up to floating-point
rounding: the rest is computed as a shorter, masked forward).

Jobs hear back through ``emit`` (called on the engine thread): :class:`Token` events, then one
:class:`Finished`. An exception while serving one job (its prefill, its sampling) ends that job alone with
``Finished('error')``; one in a batched decode step ends the jobs of that step; the engine goes on. Should the
thread die all the same, :attr:`Engine.failure` says why, every job it held ends with ``Finished('error')`` and
:meth:`Engine.submit` refuses new ones (:class:`EngineDown`), so no caller waits for an answer that cannot come.

The queue, the thread and what a failure does are :class:`JobQueue`'s, which the encoder-decoders' engine
(:class:`lmforge.serve.seq2seq_engine.Seq2SeqEngine`) shares.

Sampling follows the job's :class:`~lmforge.options.Sampling` with the functions :func:`lmforge.generate.generate`
uses (repetition penalty, :func:`~lmforge.generate.sample_next`) and a generator per job, so a job samples the
tokens it would sample alone.
"""

from __future__ import annotations

import collections
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.generate import apply_repetition_penalty, sample_next
from lmforge.model.gpt import GPT, KVCache
from lmforge.options import BEAMLESS, Sampling, Search
from lmforge.runtime import Runtime


@dataclass
class Token:
    id: int
    logprob: float | None = None
    """log P(token) under the model (temperature 1), when the job asked for logprobs."""
    top: list[tuple[int, float]] | None = None
    """The ``logprobs`` most likely tokens at this position and their log-probabilities."""


@dataclass
class Finished:
    reason: str
    """'stop' (a stop token, or cancelled after a stop string), 'length' (max_tokens), 'cancelled', 'error'."""
    error: str | None = None
    """With 'error': what went wrong (the exception's type and message)."""


@dataclass
class Job:
    prompt: list[int]
    """Token ids: a decoder's prompt, or an encoder-decoder's framed source (its tokens, then end-of-text)."""
    max_tokens: int
    emit: Callable[[Token | Finished], None]
    sampling: Sampling = Sampling()
    search: Search = BEAMLESS
    """Beam search (an encoder-decoder's engine only: :class:`~lmforge.serve.seq2seq_engine.Seq2SeqEngine`)."""
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    """With a repetition penalty: (V,) True where the token is in the prompt or the output so far."""

    def cancel(self) -> None:
        """Stop this job at the next step (thread-safe): its row is freed, it emits Finished('cancelled')."""
        self.cancelled.set()


class QueueFull(Exception):
    """More jobs are waiting than ``max_queue`` allows."""


class EngineDown(Exception):
    """The engine thread died (:attr:`JobQueue.failure` says why): it runs no more jobs."""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class JobQueue:
    """What every engine shares: the waiting jobs (at most ``max_queue``), the thread that serves them, and what
    happens when a job, a step or the thread itself fails. A subclass says how jobs run: :meth:`_prepare` once the
    thread starts, :meth:`_step` whenever jobs wait or run, :meth:`_running` (the jobs begun and not finished) and
    :meth:`_release` once it stops."""

    def __init__(self, model: torch.nn.Module, rt: Runtime, max_batch: int, max_queue: int):
        self.model, self.rt = model, rt
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list = []
        """What runs now, one entry per job (their number is /health's ``running``)."""
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._died: str | None = None
        self.peak_batch = 0
        """The most jobs that ever ran in one step."""
        self.prompt_tokens = 0
        """Prompt tokens admitted so far."""

    def stats(self) -> dict[str, int | float]:
        """Counters for /health."""
        return {"prompt_tokens": self.prompt_tokens}

    # --- the API the server uses (any thread) --------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the engine thread died (None while it runs, or was stopped on purpose)."""
        if self._died is None and self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread ended"  # not through _run's handler: only a BaseException gets here
        return self._died

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull if ``max_queue`` jobs are already waiting, EngineDown if the thread died."""
        with self._cv:
            if self.failure is not None:
                raise EngineDown(self.failure)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self._cv.notify()

    def start(self) -> None:
        """Run the engine thread (again, after :meth:`stop`: the waiting jobs are still queued)."""
        self._stopping, self._died = False, None
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread: the running jobs end with ``Finished('cancelled')`` at their next step; the waiting
        ones stay queued."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug outside any one job: say so, and end every job rather than leave it waiting
            traceback.print_exc()
            with self._cv:
                self._died = f"the engine stopped: {_describe(e)}"
                jobs = self._running() + list(self.waiting)
                self.rows.clear()
                self.waiting.clear()
            for job in jobs:
                self._end(job, Finished("error", self._died))

    def _serve(self) -> None:
        self._prepare()
        with torch.inference_mode(), self.rt.autocast():
            self.model.eval()
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._stopping or self.waiting or self.rows)
                    if self._stopping:
                        break
                self._step()
        for job in self._running():
            self._end(job, Finished("cancelled"))
        self.rows.clear()
        self._release()

    def _prepare(self) -> None:
        """Set up what serving needs (on the engine thread, before the first job)."""

    def _step(self) -> None:
        """Run the jobs some more: admit waiting ones, generate (called while jobs wait or run)."""
        raise NotImplementedError

    def _running(self) -> list[Job]:
        """The jobs begun and not finished."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what :meth:`_prepare` set up (the thread is stopping)."""

    @staticmethod
    def _end(job: Job, event: Finished) -> None:
        """Tell a job it is over; a job whose listener is gone (its event loop closed) has nobody to tell."""
        try:
            job.emit(event)
        except Exception:  # the listener's failure must not end the engine for everyone else
            traceback.print_exc()

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        """End ``jobs`` with the error ``e`` (a bug: its traceback goes to stderr, its message to the clients)."""
        print(f"lmforge serve: {len(jobs)} request(s) failed in the engine: {_describe(e)}", file=sys.stderr)
        traceback.print_exception(e)
        for job in jobs:
            self._end(job, Finished("error", _describe(e)))


@dataclass
class _Row:
    job: Job
    length: int
    """Tokens in this row's cache (the prompt and every generated token but the last)."""
    last: int
    """The newest token, fed in at the next decode step."""
    tokens: list[int]
    """The prompt and every token generated so far: the cache holds the first ``length`` of them."""


BLOCK = 16
"""Tokens per block of the prefix cache: a prompt reuses whole blocks only (vLLM uses 16 too)."""


@dataclass(eq=False)
class _Node:
    """One block of a stored token sequence: its tokens, and the keys/values of every layer at their slots."""
    tokens: tuple[int, ...]
    kv: torch.Tensor | None
    """(layers, 2, kv_heads, BLOCK, head_dim): keys then values; None at the root."""
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)


class PrefixCache:
    """The keys/values of recently seen token sequences, in blocks of :data:`BLOCK` tokens, for prompts that share a
    prefix (a system prompt, a chat history re-sent each turn).

    A trie of blocks: a block is found from the root by the exact token ids of every block before it and its own (no
    hash: no collision can hand a prompt another prompt's keys). At most ``budget`` bytes of keys/values are kept;
    the least recently used block goes first. A lookup or an insert touches its chain from the deepest block up, so
    a block is always more recently used than every block below it: the least recently used one is a leaf, and
    eviction never strands a subtree.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        """Bytes of keys/values stored."""
        self.root = _Node((), None, None)
        self._lru: collections.OrderedDict[_Node, None] = collections.OrderedDict()

    def match(self, tokens: list[int], limit: int) -> list[_Node]:
        """The stored blocks that begin ``tokens``, as long a chain as there is within its first ``limit`` tokens."""
        chain, node = [], self.root
        for i in range(0, limit - BLOCK + 1, BLOCK):
            node = node.children.get(tuple(tokens[i: i + BLOCK]))
            if node is None:
                break
            chain.append(node)
        self._touch(chain)
        return chain

    @staticmethod
    def load(chain: list[_Node]) -> torch.Tensor:
        """The keys/values of a chain, end to end: (layers, 2, kv_heads, BLOCK * len(chain), head_dim)."""
        return torch.cat([node.kv for node in chain], dim=3)

    def insert(self, tokens: list[int], kv_of: Callable[[int, int], torch.Tensor]) -> None:
        """Store every whole block of ``tokens`` not stored yet; ``kv_of(a, b)`` gives the keys/values of slots [a, b)
        ((layers, 2, kv_heads, b - a, head_dim)), asked once for all the new blocks."""
        chain = self.match(tokens, len(tokens))
        node = chain[-1] if chain else self.root
        start, end = len(chain) * BLOCK, len(tokens) // BLOCK * BLOCK
        if start == end:
            return
        kv = kv_of(start, end)
        block_bytes = kv.element_size() * kv.numel() // ((end - start) // BLOCK)
        # Never more than the budget holds: evicting this chain's own first blocks for its last ones gains nothing.
        end = min(end, start + (self.budget // block_bytes - len(chain)) * BLOCK)
        new = []
        for a in range(start, end, BLOCK):
            while self.used + block_bytes > self.budget:
                self._evict()
            block = tuple(tokens[a: a + BLOCK])
            child = _Node(block, kv[:, :, :, a - start: a - start + BLOCK].clone(), node)
            node.children[block] = child
            node = child
            self.used += block_bytes
            new.append(node)
        self._touch(chain + new)

    def _touch(self, chain: list[_Node]) -> None:
        for node in reversed(chain):
            self._lru[node] = None
            self._lru.move_to_end(node)

    def _evict(self) -> None:
        node, _ = self._lru.popitem(last=False)
        assert not node.children, "a block is evicted before the blocks below it"
        del node.parent.children[node.tokens]
        self.used -= node.kv.element_size() * node.kv.numel()


class Engine(JobQueue):
    """Runs jobs on a decoder-only ``model`` in a background thread (see the module docstring)."""

    def __init__(self, model: GPT, rt: Runtime, max_batch: int = 16, max_queue: int = 64,
                 step_model: torch.nn.Module | None = None, static: bool = False, prefix_cache_mib: float = 0):
        """``static``: static batching, for comparison: waiting jobs are admitted only once every running one has
        finished (the batch runs as long as its longest job). ``prefix_cache_mib``: memory for the keys/values of
        recent prompts and outputs, which prompts that begin with them reuse (:class:`PrefixCache`; 0: none)."""
        super().__init__(model, rt, max_batch, max_queue)
        self.static = static
        self.step_model = model if step_model is None else step_model
        self.rows: list[_Row] = []
        self.prefix = PrefixCache(int(prefix_cache_mib * 2**20)) if prefix_cache_mib > 0 else None
        self.reused_tokens = 0
        """Of the prompt tokens, those whose keys/values came from the prefix cache (not prefilled)."""

    def stats(self) -> dict[str, int | float]:
        """Counters for /health: prompt tokens admitted, how many the prefix cache saved, its size in MiB."""
        out: dict[str, int | float] = {**super().stats(), "reused_tokens": self.reused_tokens}
        if self.prefix is not None:
            out["prefix_cache_mib"] = round(self.prefix.used / 2**20, 1)
        return out

    # --- the engine thread ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.model.cfg
        device = self.model.device
        dtype = torch.get_autocast_dtype(device.type) if self.rt.autocast_dtype else self.model.dtype
        self.caches = [KVCache.empty(self.max_batch, b.attn.n_kv, cfg.block_size, b.attn.hd, dtype, device)
                       for b in self.model.blocks]
        self.slots = torch.arange(cfg.block_size, device=device)

    def _step(self) -> None:
        self._admit()
        if self.rows:
            self._decode()

    def _running(self) -> list[Job]:
        return [row.job for row in self.rows]

    def _release(self) -> None:
        self.model.clear_cache()

    def _admit(self) -> None:
        """Prefill waiting jobs into free rows, one at a time."""
        if self.static and self.rows:
            return
        while len(self.rows) < self.max_batch:
            with self._cv:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled.is_set():
                self._end(job, Finished("cancelled"))
                continue
            r = len(self.rows)
            try:
                logits = self._prefill(job, r)
            except Exception as e:  # this job's own failure: the row it was written into is simply not taken
                self._fail([job], e)
                continue
            row = _Row(job, len(job.prompt), -1, list(job.prompt))
            self.rows.append(row)
            if not self._take(row, logits):
                self._leave(r)

    def _prefill(self, job: Job, r: int) -> torch.Tensor:
        """Set up ``job`` (generator, seen tokens), write its prompt into cache row r; its next-token logits (V,)."""
        job.generator = torch.Generator(device=self.model.device)
        if job.sampling.seed is None:
            job.generator.seed()
        else:
            job.generator.manual_seed(job.sampling.seed)
        if job.sampling.repetition_penalty != 1.0:
            job.seen = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.model.device)
            job.seen[job.prompt] = True
        p, n = len(job.prompt), 0
        if self.prefix is not None and (chain := self.prefix.match(job.prompt, p - 1)):
            kv = self.prefix.load(chain)
            n = kv.shape[3]
            for layer, c in enumerate(self.caches):
                c.k[r, :, :n] = kv[layer, 0]
                c.v[r, :, :n] = kv[layer, 1]
        self._use_caches(lambda c: c.rows(r, r + 1))
        ids = torch.tensor([job.prompt[n:]], device=self.slots.device)
        # After a stored prefix the queries are slots [n, p) over keys [0, p): causal, but not the square mask that
        # no mask means (a single query needs none: it sees every key).
        mask = (self.slots[None, :p] <= self.slots[n:p, None])[None, None] if 0 < n < p - 1 else None
        logits, _ = self.step_model(ids, positions=self.slots[n:p], mask=mask, cache_start=n, last_only=True)
        self.prompt_tokens += p
        self.reused_tokens += n
        self._remember(r, job.prompt)
        return logits[0, -1]

    def _remember(self, r: int, tokens: list[int]) -> None:
        """Store the keys/values of ``tokens`` (what cache row r holds first) in the prefix cache, if there is one."""
        if self.prefix is None:
            return

        def kv_of(a: int, b: int) -> torch.Tensor:
            return torch.stack([torch.stack([c.k[r, :, a:b], c.v[r, :, a:b]]) for c in self.caches])

        self.prefix.insert(tokens, kv_of)

    def _decode(self) -> None:
        """One token for every running row."""
        n = len(self.rows)
        self.peak_batch = max(self.peak_batch, n)
        # Attention reads no slot past the longest row; a compiled step reads them all (one shape, no recompiles).
        span = self.model.cfg.block_size if self.step_model is not self.model else \
            max(row.length for row in self.rows) + 1

        def full(cache: KVCache) -> KVCache:
            cache.span = span
            return cache

        self._use_caches(full)
        device = self.slots.device
        ids = torch.tensor([[row.last] for row in self.rows], device=device)
        at = torch.tensor([row.length for row in self.rows], device=device)
        mask = (self.slots[None, :span] <= at[:, None])[:, None, None, :]  # (n, 1, 1, span): each row its own
        try:
            logits, _ = self.step_model(ids, positions=at[:, None], mask=mask, cache_start=at, last_only=True)
        except Exception as e:  # one step for every row: which row caused it cannot be told, so the step's rows end
            self._fail([row.job for row in self.rows], e)
            self.rows.clear()
            return
        for row in self.rows:
            row.length += 1
        for r in reversed(range(n)):  # from the end: a row that leaves is replaced by the last one
            if not self._take(self.rows[r], logits[r, -1]):
                self._leave(r)

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample the row's next token from its logits (V,), tell its job; False if the job is done."""
        try:
            return self._sample(row, logits)
        except Exception as e:  # this job's own failure (its sampling settings, its logprobs)
            self._fail([row.job], e)
            return False

    def _sample(self, row: _Row, logits: torch.Tensor) -> bool:
        job = row.job
        if job.cancelled.is_set():
            self._end(job, Finished("cancelled"))
            return False
        logits = logits.float()
        s = job.sampling
        scores = logits[None] if job.seen is None else \
            apply_repetition_penalty(logits[None], job.seen[None], s.repetition_penalty)
        tok = int(sample_next(scores, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              generator=job.generator)[0])
        if job.seen is not None:
            job.seen[tok] = True
        if tok in job.stop_ids:
            job.emit(Finished("stop"))
            return False
        job.generated += 1
        row.tokens.append(tok)
        job.emit(self._token(tok, logits, job.logprobs))
        if job.generated >= job.max_tokens:
            job.emit(Finished("length"))
            return False
        row.last = tok
        return True

    @staticmethod
    def _token(tok: int, logits: torch.Tensor, logprobs: int | None) -> Token:
        if logprobs is None:
            return Token(tok)
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, max(1, logprobs))
        return Token(tok, float(lp[tok]), list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))

    def _leave(self, r: int) -> None:
        """Free row r: the last running row moves into it (its cache row copied), so rows stay contiguous."""
        row = self.rows[r]
        self._remember(r, row.tokens[: row.length])  # a chat's next turn begins with this one's prompt and answer
        last = len(self.rows) - 1
        if r != last:
            for c in self.caches:
                c.k[r].copy_(c.k[last])
                c.v[r].copy_(c.v[last])
            self.rows[r] = self.rows[last]
        self.rows.pop()

    def _use_caches(self, view: Callable[[KVCache], KVCache]) -> None:
        for block, cache in zip(self.model.blocks, self.caches, strict=True):
            block.attn.kv_cache = view(cache)

    # --- scoring (echo / logprobs of a prompt) ---------------------------------------------------------

    def score(self, prompt: list[int], top: int) -> list[Token]:
        """log P(token | the tokens before it) for every prompt token but the first (not queued: the caller
        runs it on a worker thread; it does not touch the KV cache)."""
        with torch.inference_mode(), self.rt.autocast():
            ids = torch.tensor([prompt], device=self.model.device)
            logits, _ = self.model(ids)
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        out = []
        for i in range(1, len(prompt)):
            values, indices = torch.topk(lp[i - 1], max(1, top))
            out.append(Token(prompt[i], float(lp[i - 1, prompt[i]]),
                             list(zip(indices.tolist(), values.tolist(), strict=True))))
        return out
