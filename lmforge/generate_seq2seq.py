"""Writing a target for each source with an encoder-decoder: the encoder reads the batch of sources once, then the
decoder writes one token per step with its static KV cache (:meth:`EncoderDecoder.setup_cache`), as
:mod:`lmforge.generate` does for a decoder-only model, whose token choice, stop handling and text streaming this
reuses. Sources are right-padded (the encoder masks the padding out); every row writes its t-th token at the same
decoder position, so no target-side padding is needed.

Tokens are chosen one at a time as :class:`~lmforge.options.Sampling` says (greedy at temperature 0), or by beam
search (:class:`~lmforge.options.Search`), which is transformers' ``_beam_search`` (5.x) step for step, so that the
same weights give ``BartForConditionalGeneration.generate``'s tokens (``early_stopping=False``): at each step the
``2 * beams`` likeliest continuations of all beams by summed log-probability; among them, the ``beams`` likeliest
that do not end continue, and those among the first ``beams`` that end (end-of-text, or the last step) join the
finished hypotheses, scored summed log-probability / generated length (end-of-text counted) ** length_penalty, best
``beams`` kept. A batch row stops once its best running beam, divided by its current length ** length_penalty, cannot
beat its worst finished hypothesis (and it has ``beams`` of them) -- transformers' heuristic, not a bound: with a
positive penalty a longer output might still have won.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import TextIO

import torch

from lmforge.data.seq2seq import Seq2SeqTokens, encode_pairs, pad_batch
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate import (
    apply_repetition_penalty,
    continue_command,
    generate_from_ids,
    read_prompts,
    record_tokens,
    sample_next,
    seeded_generator,
)
from lmforge.loading import LoadedRun, load_writer
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.options import BEAMLESS, GREEDY, GenerateOptions, Sampling, Search
from lmforge.runtime import Runtime, eval_mode, setup_runtime

NEG = -1.0e9
"""transformers' stand-in for minus infinity in beam scores: a hypothesis that must not be chosen gets it added."""


@torch.inference_mode()
def generate_seq2seq(model: EncoderDecoder, sources: list[list[int]], max_new_tokens: int, tokens: Seq2SeqTokens, *,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float = 1.0, seed: int | None = None, beams: int = 1,
                     length_penalty: float = 1.0, stop_ids: Sequence[int] = (),
                     on_token: Callable[[int, int], bool | None] | None = None) -> list[list[int]]:
    """The target token ids ``model`` writes for each source (framed ids: :func:`lmforge.data.seq2seq.frame_source`),
    without the decoder's start token and the end-of-text that ends it.

    The decoder starts from ``tokens.decoder_start`` and a row stops at ``tokens.eos`` or any of ``stop_ids`` (not
    returned), or after ``max_new_tokens``, which the decoder's context caps at ``block_size`` (with a warning).
    Sampling (beams 1): repetition penalty, then temperature (0 = greedy), top-k, top-p, seeded by ``seed``, as
    :func:`lmforge.generate.generate` draws them; beams > 1: beam search (see the module doc), which needs temperature
    0. The repetition penalty counts the decoder's start token as seen, as transformers does (it is end-of-text, so
    a penalty above 1 also makes ending less likely); beam search applies it to the log-probabilities.

    on_token(row, token_id) is called for each new token (returning True ends that row, the token kept): as it comes
    when sampling; for beam search, whose tokens are final only at the end, then, in order. Runs in eval mode on the
    model's device; under ``torch.autocast`` the cache holds the autocast dtype.
    """
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)  # OptionError naming a bad value
    Search(beams, length_penalty).check_sampling(sampling)
    block = model.cfg.block_size
    for i, s in enumerate(sources):
        if not s:
            raise UserError(f"source {i} is empty: frame it first (lmforge.data.seq2seq.frame_source ends it with "
                            f"end-of-text)")
        if len(s) > block:
            raise UserError(f"source {i} has {len(s)} tokens but the encoder reads at most {block}: frame it with "
                            f"lmforge.data.seq2seq.frame_source, which cuts it")
    if max_new_tokens > block:
        # The decoder reads its start token and all but the last new token: block_size new tokens fill its context.
        # stacklevel 3: past torch.inference_mode's wrapper, to the caller.
        warnings.warn(f"{max_new_tokens} new tokens pass the decoder's context of {block} tokens: writing at most "
                      f"{block}", stacklevel=3)
        max_new_tokens = block
    if max_new_tokens <= 0 or not sources:
        return [[] for _ in sources]
    device = model.device
    src, src_mask = (t.to(device) for t in pad_batch(sources, tokens.pad))
    stop = {tokens.eos, *stop_ids}
    # Under autocast the keys/values come out in the autocast dtype: the cache stores them so.
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    with eval_mode(model):
        memory = model.encode(src, src_mask)
        try:
            if beams == 1:
                return _one_at_a_time(model, memory, src_mask, max_new_tokens, tokens, stop, sampling, on_token,
                                      cache_dtype)
            outs = _beam_search(model, memory, src_mask, max_new_tokens, tokens, stop, beams, length_penalty,
                                repetition_penalty, cache_dtype)
        finally:
            model.clear_cache()
    if on_token is not None:
        for row, out in enumerate(outs):
            for i, tok in enumerate(out):
                if on_token(row, tok):
                    del out[i + 1:]
                    break
    return outs


def _one_at_a_time(model: EncoderDecoder, memory: torch.Tensor, src_mask: torch.Tensor, n: int, tokens: Seq2SeqTokens,
                   stop: set[int], sampling: Sampling, on_token: Callable[[int, int], bool | None] | None,
                   cache_dtype: torch.dtype | None) -> list[list[int]]:
    """Greedy or sampled decoding: each step feeds every row's last token, draws the next."""
    B, device = memory.size(0), memory.device
    model.setup_cache(memory, n, cache_dtype)  # the decoder reads its start token and the first n - 1 new ones
    tok = torch.full((B, 1), tokens.decoder_start, dtype=torch.long, device=device)
    seen = _seen_start(B, model.cfg.vocab_size, tokens, device) if sampling.repetition_penalty != 1.0 else None
    generator = seeded_generator(device, sampling.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(n):
        logits = model.decode(tok, None, src_mask, cache_start=t, last_only=True)[:, -1].float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
        nxt = sample_next(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          generator=generator)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        tok = nxt[:, None]
        if record_tokens(nxt.tolist(), out, done, stop, on_token):
            break
    return out


def _seen_start(rows: int, vocab: int, tokens: Seq2SeqTokens, device: torch.device) -> torch.Tensor:
    """(rows, vocab) of the tokens the repetition penalty counts at the start: the decoder's start token."""
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    seen[:, tokens.decoder_start] = True
    return seen


def _beam_search(model: EncoderDecoder, memory: torch.Tensor, src_mask: torch.Tensor, n: int, tokens: Seq2SeqTokens,
                 stop: set[int], beams: int, length_penalty: float, repetition_penalty: float,
                 cache_dtype: torch.dtype | None) -> list[list[int]]:
    """transformers' beam search (module doc), batched: row b's beams are decoder rows b * beams ... b * beams +
    beams - 1, over copies of its encoder output. The score arithmetic, its order and the -1e9 stand-ins are
    transformers', so that equal logits choose equal tokens."""
    B, K, V, device = memory.size(0), beams, model.cfg.vocab_size, memory.device
    model.setup_cache(memory.repeat_interleave(K, 0), n, cache_dtype)
    mask = src_mask.repeat_interleave(K, 0)
    # Enough candidates that K stay unfinished even if every beam's best continuation ends.
    keep = max(2, 1 + len(stop)) * K
    is_top = torch.arange(keep, device=device) < K  # only these candidates may become finished hypotheses
    ends_with = torch.tensor(sorted(stop), device=device)
    first_row = torch.arange(B, device=device)[:, None] * K
    seqs = torch.full((B, K, n + 1), tokens.pad, dtype=torch.long, device=device)
    seqs[:, :, 0] = tokens.decoder_start
    running = torch.zeros(B, K, device=device)
    running[:, 1:] = NEG  # the beams start equal: the first step continues beam 0 only, not K copies of it
    seen = _seen_start(B * K, V, tokens, device) if repetition_penalty != 1.0 else None
    # The finished hypotheses: ids, scores, lengths (new tokens, the end included), which slots hold one.
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, K), NEG, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    for t in range(1, n + 1):  # t: the new token's index (and the length it gives)
        logits = model.decode(seqs[:, :, t - 1].reshape(B * K, 1), None, mask, cache_start=t - 1, last_only=True)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        if seen is not None:
            logp = apply_repetition_penalty(logp, seen, repetition_penalty)
        total = (logp.view(B, K, V) + running[:, :, None]).view(B, K * V)
        cand_scores, cand = torch.topk(total, keep)
        beam, tok = cand // V, cand % V
        cand_seqs = _gather(seqs, beam)
        cand_seqs[:, :, t] = tok
        ends = torch.isin(tok, ends_with) | (t == n)
        # The K best candidates that do not end continue (sorted: beam 0 is the best).
        live = cand_scores + ends.to(torch.float32) * NEG
        pick = torch.topk(live, K)[1]
        seqs, running, rows = _gather(cand_seqs, pick), _gather(live, pick), _gather(beam, pick) + first_row
        # Those of the first K that end join the finished ones, scored per length; the best K stay.
        just = ends & is_top[None, :]
        scores = cand_scores / (t ** length_penalty)
        scores = scores + (~improvable).to(torch.float32) * NEG
        scores = scores + (~just) * NEG
        best = torch.topk(torch.cat((fin_scores, scores), dim=1), K)[1]
        fin_seqs = _gather(torch.cat((fin_seqs, cand_seqs), dim=1), best)
        fin_scores = _gather(torch.cat((fin_scores, scores), dim=1), best)
        fin_len = _gather(torch.cat((fin_len, torch.full_like(tok, t)), dim=1), best)
        finished = _gather(torch.cat((finished, just), dim=1), best)
        # Each continuing beam's cache (and seen tokens) are those of the beam it extends.
        model.reorder_cache(rows.view(-1), t)  # slots 0 .. t-1 are written
        if seen is not None:
            seen = seen[rows.view(-1)]
            seen[torch.arange(B * K, device=device), seqs[:, :, t].reshape(-1)] = True
        worst = torch.where(finished, fin_scores.min(dim=1, keepdim=True)[0], NEG)
        improvable = improvable & (running[:, :1] / (t ** length_penalty) > worst).any(dim=-1, keepdim=True)
        if not improvable.any() or ends.all():
            break
    outs = []
    for b in range(B):
        ids = fin_seqs[b, 0, 1:fin_len[b, 0] + 1].tolist()
        outs.append(ids[:-1] if ids and ids[-1] in stop else ids)
    return outs


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j], ...] for a (B, N, ...) ``x`` and (B, M) ``index``: (B, M, ...)."""
    return torch.take_along_dim(x, index.view(*index.shape, *[1] * (x.dim() - 2)), dim=1)


def frame_sources(tokenizer: Tokenizer, sources: list[str], block_size: int) -> tuple[list[list[int]], Seq2SeqTokens]:
    """(The encoder's inputs for the source texts, the special ids): each source cut to its first block_size - 1
    tokens and ended with end-of-text, one warning counting the sources cut."""
    tokens = Seq2SeqTokens.of(tokenizer)
    framed, _, cut, _ = encode_pairs(tokenizer, sources, None, block_size, tokens)
    if cut:
        # stacklevel 3: past generate_targets, to its caller.
        warnings.warn(f"{cut} of {len(sources)} sources are longer than the encoder's context of {block_size - 1} "
                      f"tokens: cut to their first {block_size - 1}", stacklevel=3)
    return framed, tokens


def generate_targets(model: EncoderDecoder, tokenizer: Tokenizer, sources: list[str], max_new_tokens: int,
                     sampling: Sampling = GREEDY, search: Search = BEAMLESS, *, stop_strings: Sequence[str] = (),
                     stream: TextIO | None = None, batch_size: int | None = None,
                     progress: Callable[[int], object] | None = None) -> list[str]:
    """The target text ``model`` writes for each source text (by :func:`generate_seq2seq`; ``sampling`` and
    ``search`` say how), cut before the first stop string.

    A source longer than the encoder's context keeps its first block_size - 1 tokens (then end-of-text), and one
    warning counts the sources cut, rather than refusing them: a summarization source is routinely longer than the
    context, and its beginning usually carries what matters most.

    stream: as :func:`lmforge.generate.generate_text` writes it (one source: the target as it comes, but beam
    search's only at the end; several: each finished target, separated by a line ``----``), in one batch only.
    batch_size: sources per batch (default: all in one); progress(n) is called after each batch of n.
    """
    search.check_sampling(sampling)
    framed, tokens = frame_sources(tokenizer, sources, model.cfg.block_size)
    decode = partial(_decode_framed, tokens=tokens, search=search)
    size = batch_size or max(len(framed), 1)
    texts: list[str] = []
    for i in range(0, len(framed), size):
        batch = framed[i:i + size]
        texts += generate_from_ids(model, tokenizer, batch, max_new_tokens, sampling, stop_strings=stop_strings,
                                   stop_ids=(), stream=stream if size >= len(framed) else None, decode=decode)
        if progress is not None:
            progress(len(batch))
    return texts


def _decode_framed(model: EncoderDecoder, sources: list[list[int]], max_new_tokens: int, *, tokens: Seq2SeqTokens,
                   search: Search, **kwargs) -> list[list[int]]:
    """:func:`generate_seq2seq` with :func:`lmforge.generate.generate`'s signature (the decode step of
    :func:`lmforge.generate.generate_from_ids`)."""
    return generate_seq2seq(model, sources, max_new_tokens, tokens, beams=search.beams,
                            length_penalty=search.length_penalty, **kwargs)


def generate_command(o: GenerateOptions) -> None:
    """``lmforge generate``: load the run; a decoder-only one continues the prompts
    (:func:`lmforge.generate.continue_command`), an encoder-decoder writes the target of each source."""
    prompts = read_prompts(o)
    rt = setup_runtime(o.device, o.precision)
    run = load_writer(o.run, rt.device, "lmforge generate")
    if run.task == "lm":
        if o.search.beams > 1:
            raise UserError(f"--beams: beam search is for encoder-decoder runs; '{o.run}' is a decoder-only language "
                            f"model (drop --beams: -t 0 decodes greedily)")
        continue_command(o, prompts, run, rt)
        return
    _write_command(o, prompts, run, rt)


def _write_command(o: GenerateOptions, sources: list[str], run: LoadedRun, rt: Runtime) -> None:
    """``lmforge generate`` on an encoder-decoder run: print the target of each source (one source: streamed)."""
    for flag, given in (("--chat", o.chat), ("--lookup", o.lookup is not None), ("--draft", o.draft is not None),
                        ("--compile", o.compile)):
        if given:
            raise UserError(f"{flag} is for decoder-only runs; '{o.run}' is an encoder-decoder (drop {flag})")
    if not sources:
        raise UserError(f"'{o.run}' is an encoder-decoder: it writes a target for a source; give one with -p TEXT "
                        f"or --prompt-file FILE")
    with rt.autocast():
        texts = generate_targets(run.model, run.tokenizer, sources, o.max_new_tokens, o.sampling, o.search,
                                 stop_strings=o.stop, stream=sys.stdout if len(sources) == 1 else None)
    if len(sources) == 1:
        print(flush=True)
    else:
        for text in texts:
            print(f"{text}\n----", flush=True)
    for i, text in enumerate(texts):
        if not text.strip():
            which = "" if len(texts) == 1 else f"source {i + 1}: "
            tip = "try sampling with -t 0.8" if o.sampling.temperature == 0 else "try another --seed"
            print(f"({which}the model wrote an empty target; {tip}, or more training)", file=sys.stderr)
