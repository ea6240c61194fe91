"""Serving an encoder-decoder: batches of waiting jobs, each written to its end by one call of
:func:`~lmforge.generate_seq2seq.generate_seq2seq`.

A job's prompt is its framed source (its tokens, then end-of-text: :func:`lmforge.data.seq2seq.frame_source`). The
decoder-only engine (:class:`~lmforge.serve.engine.Engine`) joins jobs to its running batch between two steps; here a
batch runs from the encoder's pass to its last row's end in one call of the function ``lmforge generate`` uses (so a
request gets the command's tokens), and jobs that arrive meanwhile wait for the next batch. Static batching: the
smallest thing that is right, at the price of a wait of up to one batch (at most ``block_size`` decoder steps).

One call takes one setting for all its rows, so a batch is the oldest waiting job and the next ones that
:func:`batch_key` says may share its call, up to ``max_batch`` decoder rows (a beam-search job takes ``beams``):

- greedy jobs (temperature 0: seed, top-k and top-p change nothing) with the same repetition penalty, stop ids and
  beam search; with beams also the same ``max_tokens``, which changes the search (its last step ends every
  hypothesis). Greedy rows give what each gives alone (up to floating-point rounding: padding other sources to the
  longest changes the shapes);
- sampled jobs without a seed and with the same settings (the batch draws from one freshly seeded generator);
- a sampled job with a seed runs alone: a batch draws every row's tokens from one generator, so a seed gives the same
  text again only if nothing else draws beside it.

Each row ends at its own job's ``max_tokens`` (the call runs for the batch's largest). A job hears :class:`Token`
events as ``generate_seq2seq`` reports the tokens (sampling: as they come; beam search: all at the end, when they are
final), then ``Finished``: 'stop' (end-of-text or a stop id), 'length' (``max_tokens``) or 'cancelled' (its client
went away, a stop string was found, or the engine is stopping), seen at the job's next token. An exception in the
call ends its batch's jobs with 'error'; one telling a single job its token ends that job only.
"""

from __future__ import annotations

import dataclasses

from lmforge.data.seq2seq import Seq2SeqTokens
from lmforge.generate_seq2seq import generate_seq2seq
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.runtime import Runtime
from lmforge.serve.engine import Finished, Job, JobQueue, Token


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys may share one call of ``generate_seq2seq`` and write what each would write alone (see
    the module doc)."""
    s = job.sampling
    if s.temperature > 0 and s.seed is not None:
        return ("alone", id(job))
    if s.temperature == 0:
        s = dataclasses.replace(s, top_k=None, top_p=None, seed=None)
    return s, job.search, job.stop_ids, job.max_tokens if job.search.beams > 1 else None


class Seq2SeqEngine(JobQueue):
    """Runs jobs on an encoder-decoder ``model`` in a background thread, a batch at a time (see the module doc)."""

    def __init__(self, model: EncoderDecoder, rt: Runtime, tokens: Seq2SeqTokens, max_batch: int = 16,
                 max_queue: int = 64):
        super().__init__(model, rt, max_batch, max_queue)
        self.tokens = tokens
        self.rows: list[Job] = []
        """The running batch's jobs that have not finished."""

    def _running(self) -> list[Job]:
        return list(self.rows)

    def _step(self) -> None:
        batch = self._take()
        if batch:
            self._write(batch)

    def _take(self) -> list[Job]:
        """The next batch, out of the queue (it becomes :attr:`rows`); cancelled waiting jobs end here."""
        with self._cv:
            gone = [job for job in self.waiting if job.cancelled.is_set()]
            live = [job for job in self.waiting if not job.cancelled.is_set()]
            batch: list[Job] = []
            if live:
                key = batch_key(live[0])
                # Beam search keeps `beams` decoder rows per job: max_batch bounds the rows, as the decoder's engine.
                room = max(1, self.max_batch // live[0].search.beams)
                batch = [job for job in live if batch_key(job) == key][:room]
            taken = {id(job) for job in batch}
            self.waiting.clear()
            self.waiting.extend(job for job in live if id(job) not in taken)
            self.rows = list(batch)
        for job in gone:
            self._end(job, Finished("cancelled"))
        return batch

    def _finish(self, job: Job, event: Finished) -> None:
        self.rows = [row for row in self.rows if row is not job]
        self._end(job, event)

    def _write(self, batch: list[Job]) -> None:
        """Write every job of ``batch`` to its end (the caller holds inference mode and the runtime's autocast)."""
        self.peak_batch = max(self.peak_batch, len(batch))
        self.prompt_tokens += sum(len(job.prompt) for job in batch)

        def on_token(r: int, tok: int) -> bool:
            """Tell row r's job its token; True ends the row."""
            job = batch[r]
            if job.cancelled.is_set() or self._stopping:
                self._finish(job, Finished("cancelled"))
                return True
            job.generated += 1
            try:
                job.emit(Token(tok))
            except Exception as e:  # this job's listener failed: the other rows go on
                self.rows = [row for row in self.rows if row is not job]
                self._fail([job], e)
                return True
            if job.generated >= job.max_tokens:
                self._finish(job, Finished("length"))
                return True
            return False

        s, search = batch[0].sampling, batch[0].search
        try:
            generate_seq2seq(self.model, [job.prompt for job in batch], max(job.max_tokens for job in batch),
                             self.tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             repetition_penalty=s.repetition_penalty, seed=s.seed, beams=search.beams,
                             length_penalty=search.length_penalty, stop_ids=sorted(batch[0].stop_ids),
                             on_token=on_token)
        except Exception as e:  # one call for every row: which row caused it cannot be told, so the batch ends
            failed, self.rows = self.rows, []
            self._fail(failed, e)
            return
        for job in self.rows:  # the rows still open ended at end-of-text or a stop id
            self._end(job, Finished("stop"))
        self.rows = []
