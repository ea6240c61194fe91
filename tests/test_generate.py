import io
import random
import warnings

import pytest
import torch
import torch.nn as nn

import lmforge.generate as gen
from lmforge.config import ModelConfig, from_dict
from lmforge.errors import UserError
from lmforge.generate import StopPrefixes, apply_repetition_penalty, generate, generate_text, sample_next
from lmforge.model.gpt import GPT
from lmforge.options import GREEDY, OptionError, Sampling
from tests.fixtures import tiny_model

VOCAB = 97


def lively_model(preset: str = "gpt2-tiny", block_size: int = 64) -> GPT:
    """A tiny random model with a large init: the default one repeats a single token forever."""
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": preset, "vocab_size": VOCAB, "n_layer": 2,
                                  "block_size": block_size})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # random norm gains would squash the signal again
                nn.init.normal_(p, std=0.3)
    return model


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class CharTokenizer:
    """Printable ASCII, one id per character; the last id is end-of-text."""

    eot_id = VOCAB - 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i) for i in ids if i != self.eot_id)


class ByteTokenizer:
    """Byte-level, like byte-level BPE: one token can end in the middle of a UTF-8 character."""

    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != self.eot_id).decode("utf-8", errors="replace")


class RecordingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_greedy_with_kv_cache_equals_recomputing_everything(preset):
    model = lively_model(preset)
    p = prompt(5)
    cached = generate(model, [p], 40, temperature=0)
    full = generate(model, [p], 40, temperature=0, use_cache=False)
    assert cached == full
    assert len(cached[0]) == 40
    assert len(set(cached[0])) > 10, "the test model should not be stuck on one token"


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_left_padded_batch_rows_equal_their_single_prompt_results(preset, use_cache):
    model = lively_model(preset)
    prompts = [prompt(3, 1), prompt(11, 2), prompt(7, 3)]
    batched = generate(model, prompts, 30, temperature=0, use_cache=use_cache)
    singles = [generate(model, [p], 30, temperature=0, use_cache=use_cache)[0] for p in prompts]
    assert batched == singles


def test_attention_mask_is_causal_hides_pads_and_leaves_no_query_without_a_key():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    mask = gen._attention_mask(valid, 0, 5)
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(mask[0, 0, 2:, :2], torch.zeros(3, 2, dtype=torch.bool)), "a real token sees a pad"
    assert mask.any(dim=-1).all(), "a fully masked query row gives NaN in some kernels"
    # A decode step: one query slot over the keys so far.
    assert torch.equal(gen._attention_mask(valid, 4, 5)[:, 0, 0], valid)


def reference_penalized_greedy(model: GPT, ids: list[int], n: int, penalty: float) -> list[int]:
    """Greedy with a repetition penalty, one full forward per token and no batching."""
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0][:, -1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[0, ids] = True
        ids.append(int(apply_repetition_penalty(logits, seen, penalty).argmax()))
    return ids[-n:]


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_counts_the_prompt_and_the_output_but_not_the_padding(use_cache):
    model = lively_model("llama-tiny")
    prompts = [prompt(3, 1), prompt(9, 2)]
    refs = [reference_penalized_greedy(model, p, 20, 3.0) for p in prompts]
    # Pad with the short row's favourite first token: counting pads as seen would change its choice.
    assert refs[0][0] not in prompts[0]
    out = generate(model, prompts, 20, temperature=0, repetition_penalty=3.0, pad_id=refs[0][0],
                   use_cache=use_cache)
    assert out == refs


def test_pad_id_does_not_matter():
    model = lively_model("llama-tiny")
    prompts = [prompt(3, 1), prompt(9, 2)]
    a = generate(model, prompts, 20, temperature=0, pad_id=0, repetition_penalty=1.3)
    b = generate(model, prompts, 20, temperature=0, pad_id=42, repetition_penalty=1.3)
    assert a == b


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    model = lively_model()
    prompts = [prompt(4, 1), prompt(6, 2)]
    a = generate(model, prompts, 30, seed=123)
    b = generate(model, prompts, 30, seed=123)
    c = generate(model, prompts, 30, seed=124)
    assert a == b
    assert a != c


def test_top_k_1_and_a_tiny_top_p_equal_greedy():
    model = lively_model("llama-tiny")
    prompts = [prompt(4, 1), prompt(8, 2)]
    greedy = generate(model, prompts, 30, temperature=0)
    assert generate(model, prompts, 30, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, prompts, 30, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # 0.5 + 0.3 reaches 0.75, 0.5 alone does not: the nucleus is {0, 1}.
    assert set(sample_next(logits, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, top_k=3, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3}
    # Sampled frequencies follow the distribution.
    freq = torch.bincount(sample_next(logits, generator=g), minlength=4) / 2000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_stop_ids_end_a_row_and_are_not_returned():
    model = lively_model()
    prompts = [prompt(4, 1), prompt(6, 2)]
    ref = generate(model, prompts, 30, temperature=0)
    i = next(i for i in range(3, 30) if ref[0][i] not in ref[0][:i] and ref[0][i] not in ref[1])
    out = generate(model, prompts, 30, temperature=0, stop_ids=[ref[0][i]])
    assert out == [ref[0][:i], ref[1]]
    # The loop ends once every row has stopped.
    calls = []
    generate(model, prompts[:1], 30, temperature=0, stop_ids=[ref[0][i]],
             on_token=lambda row, tok: calls.append(tok))
    assert calls == ref[0][:i]


def test_on_token_streams_every_new_token_and_can_stop_a_row():
    model = lively_model()
    prompts = [prompt(4, 1), prompt(6, 2)]
    seen = []
    out = generate(model, prompts, 12, temperature=0, on_token=lambda row, tok: seen.append((row, tok)))
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]
    out = generate(model, prompts, 12, temperature=0, on_token=lambda row, tok: row == 1)
    assert len(out[0]) == 12 and len(out[1]) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_breaks_a_repeating_greedy_loop():
    model = tiny_model(block_size=64)  # the default small init: greedy repeats one token
    plain = generate(model, [prompt(5)], 20, temperature=0)[0]
    penalized = generate(model, [prompt(5)], 20, temperature=0, repetition_penalty=5.0)[0]
    assert len(set(plain)) < 5
    assert len(set(penalized)) > 10


def test_a_too_long_prompt_is_left_truncated_with_a_warning():
    model = lively_model(block_size=32)
    long = prompt(40)
    with pytest.warns(UserWarning, match="dropped its first 9 tokens"):
        out = generate(model, [long], 1, temperature=0)
    assert out == generate(model, [long[-31:]], 1, temperature=0)


def reference_sliding_greedy(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy without a cache, one full forward per token and row over the window generate() defines.

    In slots of the left-padded batch, the window is [first, end): first is 0 until the window would
    hold block_size + 1 slots, then it restarts at the last block_size - 1 slots. A row sees its own
    tokens inside the window (none of its pads), numbered from 0.
    """
    block, L = model.cfg.block_size, max(len(p) for p in prompts)
    rows, first = [list(p) for p in prompts], 0
    for end in range(L, L + n):
        if end - first > block:
            first = end - (block - 1)
        for row, p in zip(rows, prompts, strict=True):
            n_pad = L - len(p)
            logits = model(torch.tensor([row[max(first - n_pad, 0):]]))[0]
            row.append(int(logits[0, -1].argmax()))
    return [row[-n:] for row in rows]


def test_a_window_that_never_slides_is_plain_greedy_without_a_warning():
    model = lively_model(block_size=32)
    prompts = [prompt(20, 1), prompt(5, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generate(model, prompts, 12, temperature=0)  # 20 + 12 = the context exactly
    assert out == [reference_penalized_greedy(model, p, 12, 1.0) for p in prompts]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_past_the_context_the_window_slides_and_every_requested_token_comes(preset, use_cache):
    model = lively_model(preset, block_size=16)
    p = prompt(10)
    with pytest.warns(UserWarning, match="sees only the last 15 to 16 tokens") as caught:
        out = generate(model, [p], 50, temperature=0, use_cache=use_cache)
    assert len(caught) == 1
    assert out == reference_sliding_greedy(model, [p], 50)
    assert len(out[0]) == 50 and len(set(out[0])) > 10, "the test model should not be stuck on one token"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_a_slid_window_keeps_hiding_a_short_rows_padding(preset):
    model = lively_model(preset, block_size=16)
    # At the first slide the short row's window still starts with pads; later ones cut into its tokens.
    prompts = [prompt(14, 1), prompt(2, 2)]
    with pytest.warns(UserWarning, match="context of 16 tokens"):
        out = generate(model, prompts, 30, temperature=0)
    assert out == reference_sliding_greedy(model, prompts, 30)


def test_generate_text_past_the_context_streams_all_its_tokens():
    class NeverEnding(CharTokenizer):
        eot_id = VOCAB  # outside the model's vocabulary: only max_new_tokens ends the text

    model = lively_model(block_size=16)
    stream = io.StringIO()
    with pytest.warns(UserWarning, match="window slides"):
        texts = generate_text(model, NeverEnding(), ["hello"], 60, GREEDY, stream=stream)
    assert len(texts[0]) == 60 and stream.getvalue() == texts[0]


def test_restores_training_mode_and_frees_the_cache():
    model = lively_model().train()
    generate(model, [prompt(4)], 3)
    assert model.training
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_bad_sampling_arguments_are_user_errors_naming_the_argument():
    model = lively_model()
    for kwargs in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"repetition_penalty": 0}):
        with pytest.raises(OptionError) as e:
            generate(model, [prompt(3)], 2, **kwargs)
        assert isinstance(e.value, UserError) and e.value.name == next(iter(kwargs))
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, [prompt(3), []], 2)


def test_bf16_autocast_with_the_cache_runs():
    model = lively_model("llama-tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, [prompt(3), prompt(7)], 10, temperature=0)
    assert [len(o) for o in out] == [10, 10]


def test_generate_text_streams_exactly_the_returned_text():
    model = lively_model()
    stream = RecordingStream()
    texts = generate_text(model, CharTokenizer(), ["hello"], 30, Sampling(seed=3), stream=stream)
    assert len(texts[0]) > 0
    assert stream.getvalue() == texts[0]
    assert len(stream.writes) > 5, "text should arrive token by token"


def test_stop_strings_cut_the_output_and_the_stream():
    model = lively_model()
    tok = CharTokenizer()
    full = generate_text(model, tok, ["hello"], 30, GREEDY)[0]
    stop = full[8:10]
    stream = io.StringIO()
    cut = generate_text(model, tok, ["hello"], 30, GREEDY, stop_strings=[stop], stream=stream)[0]
    assert cut == full[:full.index(stop)]
    assert stream.getvalue() == cut


def test_several_prompts_stream_finished_texts_separated_by_dashes():
    model = lively_model()
    stream = io.StringIO()
    texts = generate_text(model, CharTokenizer(), ["ab", "", "xyz"], 8, GREEDY, stream=stream)
    assert [len(t) for t in texts] == [8, 8, 8]
    assert stream.getvalue() == f"{texts[0]}\n----\n{texts[1]}\n----\n{texts[2]}\n"


def scripted_generate(tokens: list[int]):
    """Stands in for generate(): emits ``tokens`` through on_token as a model would."""

    def fake(model, prompts, max_new_tokens, *, stop_ids=(), on_token=None, **sampling):
        out = []
        for tok in tokens[:max_new_tokens]:
            if tok in stop_ids:
                break
            out.append(tok)
            if on_token is not None and on_token(0, tok):
                break
        return [out]

    return fake


def test_stream_never_writes_half_a_character_or_a_possible_stop_string(monkeypatch):
    tok = ByteTokenizer()
    monkeypatch.setattr(gen, "generate", scripted_generate(tok.encode("h€ <b <END> more")))
    stream = RecordingStream()
    texts = generate_text(None, tok, ["x"], 100, GREEDY, stop_strings=["<END>"], stream=stream)
    assert texts == ["h€ <b "]
    # "€" is three bytes: nothing is written until it is whole; "<" waits until "b" rules out "<END>".
    assert stream.writes == ["h", "€", " ", "<b", " "]


def test_stream_flushes_held_back_text_when_generation_ends(monkeypatch):
    tok = ByteTokenizer()
    monkeypatch.setattr(gen, "generate", scripted_generate([*tok.encode("ok <EN"), tok.eot_id, 65]))
    stream = io.StringIO()
    texts = generate_text(None, tok, ["x"], 100, GREEDY, stop_strings=["<END>"], stream=stream)
    assert texts == ["ok <EN"] and stream.getvalue() == "ok <EN"


def test_a_compiled_model_generates_the_same_tokens_as_eager():
    from torch._dynamo.utils import counters

    from lmforge.runtime import maybe_compile

    counters.clear()  # dynamo's counters are process-wide: only this test's compiles count
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    compiled = maybe_compile(model, True, dynamic=True)
    # Past the context of 32 (the re-prefills reuse the prefill's graph), then well inside it.
    with pytest.warns(UserWarning, match="window slides"):
        assert generate(compiled, prompts, 45, temperature=0.0) == generate(model, prompts, 45, temperature=0.0)
    assert generate(compiled, [[4, 4, 4, 4, 4, 4, 4]], 12, temperature=0.0) == generate(model, [[4] * 7], 12,
                                                                                         temperature=0.0)
    assert counters["stats"]["unique_graphs"] > 0  # it really compiled (no silent eager fallback)
    assert not counters["graph_break"]  # one graph a call: a break in the blocks' loop made dynamo skip the frame


def test_the_held_back_end_is_the_longest_that_could_still_become_a_stop_string():
    """The linear (Knuth-Morris-Pratt) matcher agrees at every step with the definition, which costs the square of
    the stop strings' length per token."""
    def definition(text: str, stops: list[str]) -> int:
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 7))) for _ in range(rng.randint(0, 3))]
        prefixes, text = StopPrefixes(stops), ""
        for _ in range(30):
            if rng.random() < 0.1 and text:  # a decoder that rewrites earlier text: the matcher starts again
                text = text[:-rng.randint(1, len(text))] + "b"
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
            assert prefixes.held(text) == definition(text, stops), (stops, text)
