"""Speculative decoding (prompt lookup, a draft model) gives plain greedy decoding's tokens, in fewer model steps.

The models are tiny and random with a large init (tests/test_generate.py's ``lively_model``), whose greedy choices
are far from ties: along the greedy paths below the top two logits were at least 2.1e-3 apart (logits up to ~13;
measured with a full forward per step, gpt2-tiny and llama-tiny), while checking several positions in one forward
moves float32 logits by ~1e-6, so the equalities below are exact and robust.
"""

import string
import warnings
from pathlib import Path

import pytest
import torch

from lmforge import rundir
from lmforge.config import ModelConfig, TrainConfig, from_dict, save_yaml
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate import generate
from lmforge.model.gpt import GPT
from lmforge.speculative import PromptLookup, SpeculativeStats, generate_speculative, speculative_decoder
from lmforge.training.checkpoint import save_weights_only
from tests.test_generate import VOCAB, lively_model, prompt


def noisy_copy(model: GPT, std: float) -> GPT:
    """A draft that mostly agrees with ``model``: its weights plus noise."""
    draft = lively_model(model.cfg.preset, block_size=model.cfg.block_size)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * std)
    return draft


def successor_model(period: int) -> GPT:
    """A model whose greedy next token is the current one plus 1, modulo ``period``: its blocks add nothing
    (zero output projections), and its head reads each token's embedding as its successor's."""
    model = lively_model("llama-tiny", block_size=64)
    model.cfg.tie_embeddings = False
    model.lm_head = torch.nn.Linear(model.cfg.n_embd, VOCAB, bias=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.zero_()
        model.lm_head.weight.fill_(0.0)
        for t in range(VOCAB):
            model.lm_head.weight[(t + 1) % period] += model.wte.weight[t] * 10
    return model


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_ngram():
    lookup = PromptLookup(2)
    assert lookup.propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3) == [4, 7, 1]  # the latest [1, 2] before the end
    assert PromptLookup(2).propose([5, 6, 3, 8, 7, 3], 2) == [8, 7]  # [7, 3] never occurred: [3] did
    assert PromptLookup(3).propose([1, 2, 3, 4, 5], 4) == []  # the last token never occurred before
    assert PromptLookup(2).propose([4, 4, 4], 3) == [4]  # what followed runs up to the end of the text


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_lookup_and_draft_outputs_equal_plain_greedy_decoding(preset):
    model = lively_model(preset)
    drafts = {"itself": lively_model(preset), "noisy copy": noisy_copy(model, 0.05)}
    totals = {name: SpeculativeStats() for name in ("lookup", *drafts)}
    for seed in (1, 2):
        p = prompt(8, seed) * 2
        plain = generate(model, [p], 40, temperature=0)[0]
        out, stats = generate_speculative(model, p, 40, lookup_ngram=2)
        assert out == plain
        totals["lookup"].add(stats)
        for name, draft in drafts.items():
            out, stats = generate_speculative(model, p, 40, draft=draft, num_draft_tokens=3)
            assert out == plain, name
            totals[name].add(stats)
    # Every case ran: proposals rejected (the caches rolled back), and all accepted (the draft fed two tokens).
    lookup, itself, noisy = totals["lookup"], totals["itself"], totals["noisy copy"]
    assert lookup.proposed > lookup.accepted
    # The first token comes from the prompt's forward, then 9 steps of 3 + 1 tokens and one of the last 3.
    assert itself.accepted == itself.proposed and itself.steps == 2 * 10
    assert 0 < noisy.accepted < noisy.proposed


def test_lookup_on_repeating_text_takes_several_tokens_per_model_step():
    model = successor_model(period=6)
    p = [0, 1, 2, 3, 4, 5, 0, 1]
    plain = generate(model, [p], 30, temperature=0)[0]
    assert plain == [(2 + i) % 6 for i in range(30)]
    out, stats = generate_speculative(model, p, 30, lookup_ngram=3, num_draft_tokens=4)
    assert out == plain
    # After the prompt's forward, 5 steps of 4 + 1 tokens, then the last 4.
    assert stats.accepted == stats.proposed == 24 and stats.steps == 6


def test_lookup_that_never_matches_proposes_nothing_and_takes_one_token_per_step():
    model = successor_model(period=VOCAB)
    p = [10, 11, 12, 13]
    out, stats = generate_speculative(model, p, 30, lookup_ngram=2)
    assert out == generate(model, [p], 30, temperature=0)[0] == list(range(14, 44))
    assert stats.proposed == 0 and stats.steps == 29


def test_stop_ids_and_on_token_end_the_output_as_plain_decoding_does():
    model = lively_model("llama-tiny")
    p = prompt(8, 4)
    plain = generate(model, [p], 40, temperature=0)[0]
    at = next(i for i in range(5, 40) if plain.index(plain[i]) == i)  # a token's first time, mid-way
    for kwargs in ({"draft": model}, {"lookup_ngram": 1}):
        out, stats = generate_speculative(model, p, 40, stop_ids=[plain[at]], **kwargs)
        assert out == plain[:at] and stats.stopped
        seen: list[int] = []
        out, stats = generate_speculative(model, p, 40, on_token=lambda tok, seen=seen: seen.append(tok) or
                                          len(seen) == 9, **kwargs)
        assert out == seen == plain[:9] and stats.stopped


def test_past_the_context_the_decoder_continues_plainly_where_the_window_slides():
    model = lively_model("llama-tiny", block_size=32)
    p = prompt(10, 5)
    with pytest.raises(UserError, match="10-token prompt \\+ 40 new tokens pass the context of 32"):
        generate_speculative(model, p, 40, lookup_ngram=2)
    with pytest.warns(UserWarning, match="window slides"):
        plain = generate(model, [p], 40, temperature=0)
    stats = SpeculativeStats()
    decode = speculative_decoder(generate, stats, draft=model)
    with pytest.warns(UserWarning, match="window slides"):
        assert decode(model, [p], 40, temperature=0.0) == plain
    assert stats.tokens == 32 - 1 - 10 and stats.plain_tokens == 40 - stats.tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no plain decoding, no warning
        assert decode(model, [p], 22, temperature=0.0) == [plain[0][:22]]


def write_run(folder: Path, chars: str) -> Path:
    """A run directory holding a random model (large init, as ``lively_model``) over a character tokenizer."""
    tokenizer = Tokenizer.train_char([chars])
    torch.manual_seed(0)
    cfg = TrainConfig(model=from_dict(ModelConfig, {"preset": "llama-tiny", "vocab_size": tokenizer.vocab_size,
                                                    "n_layer": 2, "block_size": 64}))
    model = GPT(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    folder.mkdir()
    save_yaml(cfg, folder / rundir.CONFIG)
    tokenizer.save(folder / rundir.TOKENIZER)
    rundir.write_run_info(folder, "pretrain", "lm")
    save_weights_only(folder, 1, model)
    return folder


def test_generate_lookup_and_draft_print_the_plain_greedy_text_and_their_stats(tmp_path, capsys, monkeypatch):
    from lmforge.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its one-line format
    run = write_run(tmp_path / "run", string.ascii_lowercase + " ")
    args = ["generate", str(run), "-p", "the cat sat on the mat, the cat", "-n", "20", "-t", "0", "--device", "cpu",
            "--precision", "fp32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    for extra in (["--lookup", "2"], ["--draft", str(run), "--draft-tokens", "3"]):
        assert main([*args, *extra]) == 0
        out, err = capsys.readouterr()
        assert out == plain
        assert err.startswith("(speculative: 20 tokens in ")
    assert main([*args, "--lookup", "2", "-t", "0.8"]) == 0
    assert "sampling decodes plainly" in capsys.readouterr().err
    other = write_run(tmp_path / "other", string.ascii_uppercase)
    assert main([*args, "--draft", str(other)]) == 2
    assert "has another tokenizer than" in capsys.readouterr().err
