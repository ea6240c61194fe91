"""Encoder-decoder generation: the cache changes nothing, batching changes nothing, beam search is transformers'
(token for token against BartForConditionalGeneration.generate), and the commands write targets for sources."""

import json
import string
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.data.seq2seq import Seq2SeqTokens, frame_source, pad_batch
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate_seq2seq import _beam_search, generate_seq2seq, generate_targets
from lmforge.model import EncoderDecoder, build_model
from lmforge.options import GREEDY, OptionError, Sampling, Search
from tests.fixtures import save_seq2seq_run
from tests.test_speculative import write_run as write_decoder_run

TOKENS = Seq2SeqTokens(eos=2, pad=1, mask=3)
SHAPES = {
    "bart": dict(pos_embedding="learned", norm="layernorm", mlp="gelu", post_norm=True),
    "llama-ish": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, decoder_layers=3),
}


def lively(shape: str = "llama-ish", vocab: int = 97, block_size: int = 32, std: float = 0.3) -> EncoderDecoder:
    """A tiny random encoder-decoder with a large init (the default one repeats one token forever): its outputs vary
    (and the llama-ish one's end at different lengths)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="encoder_decoder", vocab_size=vocab, block_size=block_size, n_layer=2,
                                    n_head=4, n_embd=64, **SHAPES[shape])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # random norm gains would squash the signal again
                nn.init.normal_(p, std=std)
    return model


def sources(lengths=(5, 11, 8, 3, 14, 7), seed: int = 3) -> list[list[int]]:
    """Framed random sources (ids above the special ones, then end-of-text)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 97, (n,), generator=g).tolist() + [TOKENS.eos] for n in lengths]


@torch.no_grad()
def greedy_without_cache(model: EncoderDecoder, src: list[int], n: int) -> list[int]:
    """The reference: the whole model(src, tgt) recomputed at every step, the argmax appended."""
    tgt = [TOKENS.decoder_start]
    for _ in range(n):
        tok = model(torch.tensor([src]), torch.tensor([tgt]))[0][0, -1].argmax().item()
        if tok == TOKENS.eos:
            break
        tgt.append(tok)
    return tgt[1:]


@torch.no_grad()
def score(model: EncoderDecoder, src: list[int], out: list[int], n: int, length_penalty: float) -> float:
    """transformers' score of a finished output: its summed log-probabilities (end-of-text included, unless it ran to
    ``n`` tokens) / its length ** length_penalty."""
    labels = out + [TOKENS.eos] if len(out) < n else out
    tgt = torch.tensor([[TOKENS.decoder_start, *labels[:-1]]])
    logp = model(torch.tensor([src]), tgt)[0][0].float().log_softmax(-1)
    return logp[torch.arange(len(labels)), labels].sum().item() / len(labels) ** length_penalty


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_with_the_cache_equals_recomputing_the_whole_model_each_step(shape):
    model = lively(shape, std=1.0 if shape == "bart" else 0.3)  # post-norm needs more to leave its one token
    srcs = sources()
    cached = generate_seq2seq(model, srcs, 24, TOKENS, temperature=0)
    assert cached == [greedy_without_cache(model, s, 24) for s in srcs]
    assert len(set(sum(cached, []))) > 5, "the test model should be lively"


@pytest.mark.parametrize("beams", [1, 4])
def test_a_padded_batch_writes_what_each_source_alone_writes(beams):
    model = lively()
    srcs = sources()
    batched = generate_seq2seq(model, srcs, 20, TOKENS, temperature=0, beams=beams)
    assert batched == [generate_seq2seq(model, [s], 20, TOKENS, temperature=0, beams=beams)[0] for s in srcs]


def test_beam_search_with_one_beam_and_no_length_penalty_is_greedy():
    # With a length penalty a single beam may pass by an end-of-text that greedy takes (a longer output can score
    # more per token); without one, a finished output is never beaten (log-probabilities only fall).
    model = lively()
    srcs = sources()
    greedy = generate_seq2seq(model, srcs, 24, TOKENS, temperature=0)
    with torch.inference_mode():
        src, mask = pad_batch(srcs, TOKENS.pad)
        try:
            beam = _beam_search(model, model.encode(src, mask), mask, 24, TOKENS, {TOKENS.eos}, 1, 0.0, 1.0, None)
        finally:
            model.clear_cache()
    assert beam == greedy


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_finds_outputs_that_score_at_least_greedys(length_penalty):
    # Not a theorem of beam search (greedy's prefix may fall out of the beams, and transformers' stopping rule is a
    # heuristic): with length_penalty 0 one of these sources does end worse than greedy. But it is what beam search is
    # for: with the default penalty and a larger one, every beam output here scores at least the greedy one, most of
    # them strictly more.
    model = lively()
    srcs = sources()
    greedy = generate_seq2seq(model, srcs, 24, TOKENS, temperature=0)
    beam = generate_seq2seq(model, srcs, 24, TOKENS, temperature=0, beams=4, length_penalty=length_penalty)
    gains = [score(model, s, b, 24, length_penalty) - score(model, s, g, 24, length_penalty)
             for s, b, g in zip(srcs, beam, greedy, strict=True)]
    assert min(gains) > -1e-5 and sum(g > 1e-3 for g in gains) >= 3, gains


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = lively()
    srcs = sources()
    a = generate_seq2seq(model, srcs, 16, TOKENS, temperature=1.0, seed=5)
    assert a == generate_seq2seq(model, srcs, 16, TOKENS, temperature=1.0, seed=5)
    assert a != generate_seq2seq(model, srcs, 16, TOKENS, temperature=1.0, seed=6)
    assert generate_seq2seq(model, srcs, 16, TOKENS, temperature=1.0, top_k=1) == \
        generate_seq2seq(model, srcs, 16, TOKENS, temperature=0)


def test_stop_ids_end_a_row_on_token_sees_each_token_and_the_context_caps_the_length():
    model = lively(block_size=16)
    srcs = sources((5, 9))
    plain = generate_seq2seq(model, srcs, 16, TOKENS, temperature=0)
    stop = plain[0][3]
    cut = generate_seq2seq(model, srcs, 16, TOKENS, temperature=0, stop_ids=[stop])
    assert cut[0] == plain[0][:plain[0].index(stop)]
    for beams in (1, 3):
        seen: list[tuple[int, int]] = []

        def on_token(row: int, tok: int, seen: list = seen) -> bool:
            seen.append((row, tok))
            return row == 0 and sum(r == 0 for r, _ in seen) == 2  # ends row 0 after its second token

        outs = generate_seq2seq(model, srcs, 16, TOKENS, temperature=0, beams=beams, on_token=on_token)
        assert outs == [[t for r, t in seen if r == row] for row in (0, 1)]
        assert len(outs[0]) == 2 and outs[1] == generate_seq2seq(model, srcs[1:], 16, TOKENS, temperature=0,
                                                                   beams=beams)[0]
    with pytest.warns(UserWarning, match="decoder's context of 16 tokens: writing at most 16"):
        generate_seq2seq(model, srcs, 40, TOKENS, temperature=0)
    with pytest.raises(UserError, match="source 1 has 17 tokens but the encoder reads at most 16"):
        generate_seq2seq(model, [srcs[0], list(range(4, 20)) + [TOKENS.eos]], 4, TOKENS)


def test_beams_below_1_and_beams_with_sampling_are_one_line_errors():
    with pytest.raises(OptionError, match="beams: expected an integer of at least 1, got 0"):
        Search(beams=0)
    with pytest.raises(OptionError, match=r"beams: beam search .* does not sample: with 4 beams give temperature 0"):
        Search(beams=4).check_sampling(Sampling(temperature=0.8))
    Search(beams=4).check_sampling(GREEDY)
    with pytest.raises(OptionError, match="does not sample"):
        generate_seq2seq(lively(), sources(), 4, TOKENS, temperature=0.7, beams=2)


def test_write_text_cuts_long_sources_with_one_warning_counting_them():
    tokenizer = Tokenizer.train_char([string.ascii_lowercase + " "])
    tokens = Seq2SeqTokens.of(tokenizer)
    model = lively(vocab=tokenizer.vocab_size, block_size=16)
    texts = ["abc", "x" * 40, "hello world", "y" * 16]
    with pytest.warns(UserWarning, match=r"^2 of 4 sources are longer than the encoder's context of 15 tokens"):
        out = generate_targets(model, tokenizer, texts, 8)
    framed = [frame_source(tokenizer.encode(t), 16, tokens) for t in texts]
    assert out == [tokenizer.decode(ids) for ids in generate_seq2seq(model, framed, 8, tokens, temperature=0)]


@pytest.mark.parametrize(("beams", "length_penalty", "repetition_penalty"),
                         [(1, 1.0, 1.0), (4, 1.0, 1.0), (4, 2.0, 1.0), (4, 0.0, 1.0), (4, -1.0, 1.0), (1, 1.0, 1.3),
                          (4, 1.0, 1.3)])
def test_outputs_equal_transformers_generate_token_for_token(beams, length_penalty, repetition_penalty):
    from transformers import BartConfig, BartForConditionalGeneration

    from lmforge.model.hf import from_hf_model

    # init_std 1 (BART's default is 0.02) and end-of-text favoured: a tiny random BART at its own init repeats one
    # token and never ends, so neither beam bookkeeping nor the end would be tested; sharper distributions also keep
    # the candidates apart (no near-ties for rounding to flip; here both models' logits come out bitwise equal).
    torch.manual_seed(0)
    hf = BartForConditionalGeneration(BartConfig(
        vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=TOKENS.pad, bos_token_id=0, eos_token_id=TOKENS.eos, decoder_start_token_id=TOKENS.eos,
        init_std=1.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_(0, 1.0)
        hf.final_logits_bias[0, TOKENS.eos] = 4.0
    ours = from_hf_model(hf).eval()
    srcs = sources((8, 4, 13), seed=1)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in srcs], batch_first=True,
                                          padding_value=TOKENS.pad)
    n = 20
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=(ids != TOKENS.pad).long(), num_beams=beams, do_sample=False,
                          max_new_tokens=n, decoder_start_token_id=TOKENS.eos, forced_bos_token_id=None,
                          forced_eos_token_id=None, no_repeat_ngram_size=0, early_stopping=False,
                          length_penalty=length_penalty, repetition_penalty=repetition_penalty)
    theirs = []
    for row in out[:, 1:].tolist():  # past the start token, up to end-of-text (the padding after it)
        theirs.append(row[:row.index(TOKENS.eos)] if TOKENS.eos in row else row)
    assert generate_seq2seq(ours, srcs, n, TOKENS, temperature=0, beams=beams, length_penalty=length_penalty,
                            repetition_penalty=repetition_penalty) == theirs
    assert len({len(t) for t in theirs}) > 1 or beams == 1  # some end, some run on: both paths compared


# --- the commands ---------------------------------------------------------------------------------------------


def write_seq2seq_run(folder: Path) -> Path:
    """A run directory holding a random encoder-decoder (large init, as ``lively``) over a character tokenizer."""
    tokenizer = Tokenizer.train_char([string.ascii_lowercase + " "])
    Seq2SeqTokens.of(tokenizer)  # adds [PAD] and [MASK], which the saved tokenizer then holds
    return save_seq2seq_run(folder, lively(vocab=tokenizer.vocab_size, block_size=24), tokenizer)


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory) -> Path:
    return write_seq2seq_run(tmp_path_factory.mktemp("s2s") / "run")


def test_generate_prints_the_target_of_each_source(seq2seq_run, capsys, monkeypatch):
    from lmforge.cli import main
    from lmforge.loading import load_run

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its one-line format
    run = load_run(seq2seq_run)
    srcs = ["the cat sat", "on the mat"]
    args = ["generate", str(seq2seq_run), "-n", "12", "-t", "0", "--device", "cpu", "--precision", "fp32"]
    for search in (Search(), Search(beams=3, length_penalty=0.5)):
        flags = ["--beams", str(search.beams), "--length-penalty", str(search.length_penalty)]
        want = generate_targets(run.model, run.tokenizer, srcs, 12, GREEDY, search)
        assert main([*args, "-p", srcs[0], *flags]) == 0
        assert capsys.readouterr().out == want[0] + "\n"
        assert main([*args, "-p", srcs[0], "-p", srcs[1], *flags]) == 0
        assert capsys.readouterr().out == "".join(f"{text}\n----\n" for text in want)


def test_eval_generate_scores_the_targets_an_encoder_decoder_writes(seq2seq_run, tmp_path):
    from lmforge.evaluate.options import EvalRequest
    from lmforge.evaluate.runner import evaluate_run
    from lmforge.loading import load_run

    task = tmp_path / "task.jsonl"
    items = [("the cat sat", "a cat"), ("on the mat", "the mat"), ("hello", "hi")]
    task.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in items))
    run = load_run(seq2seq_run)
    search = Search(beams=2)
    report = evaluate_run(str(seq2seq_run), EvalRequest(generate=str(task), search=search, batch_size=2,
                                                        max_new_tokens=10), "cpu", "fp32", progress=False)
    res = report["results"]["generate"]
    assert res["outputs"] == generate_targets(run.model, run.tokenizer, [p for p, _ in items], 10, GREEDY, search)
    assert {"bleu", "chrf", "rougeL"} <= set(res) and res["settings"]["beams"] == 2


def test_commands_refuse_what_does_not_apply_in_one_line(seq2seq_run, tmp_path, capsys):
    from lmforge.cli import main

    cpu = ["--device", "cpu", "--precision", "fp32"]
    decoder = write_decoder_run(tmp_path / "decoder", string.ascii_lowercase + " ")
    s2s = ["generate", str(seq2seq_run)]
    cases = [
        ([*s2s, "-p", "a", "--beams", "0"], "argument --beams: expected an integer of at least 1"),
        ([*s2s, "-p", "a", "--beams", "2"], "argument --beams: beam search keeps the likeliest"),
        (["generate", str(decoder), "-p", "a", "--beams", "2", "-t", "0"], "--beams: beam search is for encoder-"),
        ([*s2s, "-p", "a", "--lookup", "2", "-t", "0"], "--lookup is for decoder-only runs"),
        (s2s, "give one with -p TEXT"),
        (["chat", str(seq2seq_run)], "is an encoder-decoder (model.arch=encoder_decoder): it writes a target"),
        (["eval", str(seq2seq_run), "--lm", str(tmp_path)], "--lm and --choice score text left to right"),
    ]
    for argv, message in cases:
        try:
            status = main([*argv, *cpu])
        except SystemExit as e:  # a bad flag value: argparse's exit
            status = e.code
        assert status == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
