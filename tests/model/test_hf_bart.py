"""BART both ways (lmforge.model.hf's BART table, lmforge.interop's folders): tiny random `transformers` BART folders
load and import as our EncoderDecoder with their logits, and our encoder-decoder runs export as folders that
`transformers` loads (AutoModelForSeq2SeqLM, AutoTokenizer) and decodes greedily as ours; all checked against
`transformers` itself, no hub access."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import rundir  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import FinetuneConfig, ModelConfig, TrainConfig, from_dict, save_yaml  # noqa: E402
from lmforge.data.seq2seq import Seq2SeqTokens, collate_pairs, encode_pairs, pad_batch  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.interop import set_seq2seq_generation  # noqa: E402
from lmforge.loading import load_run  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.model.encoder_decoder import EncoderDecoder  # noqa: E402
from lmforge.model.hf import config_from_hf, from_hf_model, hf_config, to_hf_model  # noqa: E402
from lmforge.training.checkpoint import save_weights_only  # noqa: E402
from tests.fixtures import save_hf_folder  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. The end, said the fox!"
ATOL = 1e-4  # fp32 on both sides (measured: 0 here, the same kernels)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """transformers starts biases at zero and norms at one: make every weight (and BART's output bias) count."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
    return model.eval()


def _hf_bart(cls: str = "BartForConditionalGeneration", decoder_layers: int = 2, **kw) -> torch.nn.Module:
    cfg = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=decoder_layers,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, architectures=[cls], **kw)
    torch.manual_seed(0)
    return _perturbed(getattr(transformers, cls)(cfg))


def _batch(vocab: int, pad: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source ids, their attention mask, decoder inputs): the second source right-padded."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, vocab, (2, 12), generator=g)
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 7])[:, None]).long()
    return src.masked_fill(mask == 0, pad), mask, torch.randint(3, vocab, (2, 9), generator=g)


@pytest.mark.parametrize("name", ["BartForConditionalGeneration", "deeper-decoder", "BartModel"])
def test_a_bart_folder_loads_and_imports_as_our_encoder_decoder_with_its_logits(name, tmp_path):
    cls = "BartModel" if name == "BartModel" else "BartForConditionalGeneration"
    hf = _hf_bart(cls, decoder_layers=3 if name == "deeper-decoder" else 2, activation_function="gelu_new")
    save_hf_folder(hf, tmp_path / "hf", Tokenizer.train_char([TEXT]))
    src, mask, tgt = _batch(97)
    with torch.no_grad():
        out = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
        # A BartModel has no head: ours is the tied embedding (as BART's), its bias zero.
        ref = out.last_hidden_state @ hf.shared.weight.t() if cls == "BartModel" else out.logits
        for loaded in (load_run(tmp_path / "hf"), None):
            if loaded is None:  # through `lmforge import` too
                assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
                loaded = load_run(tmp_path / "run")
                info = rundir.read_run_info(tmp_path / "run")
                assert (info.kind, info.task) == ("imported", "seq2seq")
            model = loaded.model
            assert loaded.task == "seq2seq" and isinstance(model, EncoderDecoder)
            assert (model.cfg.family, model.cfg.mlp) == ("bart-style: encoder-decoder, learned, layernorm, gelu_tanh, "
                                                         "post_norm", "gelu_tanh")
            assert model.cfg.n_decoder_layer == (3 if name == "deeper-decoder" else 2)
            assert (model(src, tgt, src_mask=mask)[0] - ref).abs().max() <= ATOL


def _greedy(model: EncoderDecoder, src: torch.Tensor, mask: torch.Tensor, tokens: Seq2SeqTokens,
            max_len: int) -> list[list[int]]:
    """Plain greedy decoding, the whole prefix each step: from end-of-text to end-of-text, finished rows padded."""
    out = torch.full((src.size(0), 1), tokens.decoder_start)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    while out.size(1) < max_len and not done.all():
        nxt = model(src, out, src_mask=mask)[0][:, -1].argmax(-1).masked_fill(done, tokens.pad)
        out, done = torch.cat([out, nxt[:, None]], 1), done | (nxt == tokens.eos)
    return out.tolist()


def _our_seq2seq(tok: Tokenizer, **kw) -> EncoderDecoder:
    cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "vocab_size": tok.vocab_size, "n_embd": 32,
                                  "block_size": 24, **kw})
    torch.manual_seed(0)
    return _perturbed(build_model(cfg))


def _write_run(folder, model: EncoderDecoder, tok: Tokenizer, finetuned: bool = False):
    """``model`` as an lmforge run of an encoder-decoder: pretrained, or fine-tuned (full weights) on a base."""
    folder.mkdir()
    config = FinetuneConfig(task="seq2seq", base="base", out_dir=str(folder), model=model.cfg) if finetuned \
        else TrainConfig(out_dir=str(folder), model=model.cfg)
    save_yaml(config, folder / rundir.CONFIG)
    rundir.write_run_info(folder, "finetune" if finetuned else "pretrain", "seq2seq")
    tok.save(folder / rundir.TOKENIZER)
    save_weights_only(folder, 1, model)
    return folder


def test_an_encoder_decoder_run_exports_as_bart_that_transformers_loads_frames_and_decodes_as_ours(tmp_path, capsys):
    tok = Tokenizer.train_char([TEXT])
    tokens = Seq2SeqTokens.of(tok)  # [PAD] and [MASK] after the characters, as a run's tokenizer holds them
    ours = _our_seq2seq(tok, n_kv_head=2, decoder_layers=3)  # fewer key/value heads: exported repeated
    with torch.no_grad():  # this random model would end at once: it writes until the length limit instead
        ours.lm_head.bias[tokens.eos] -= 1.0
    run, out = _write_run(tmp_path / "run", ours, tok), tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "AutoModelForSeq2SeqLM.from_pretrained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("bart", ["BartForConditionalGeneration"])
    assert (config["encoder_layers"], config["decoder_layers"], config["max_position_embeddings"]) == (2, 3, 24)
    assert (config["pad_token_id"], config["decoder_start_token_id"]) == (tokens.pad, tokens.eos)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation.get("forced_eos_token_id") is None and generation.get("forced_bos_token_id") is None
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["the lazy dog", "fox"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    framed, _, _, _ = encode_pairs(tok, texts, None, 24, tokens)
    src, mask = pad_batch(framed, tokens.pad)
    assert batch.input_ids.tolist() == src.tolist() and batch.attention_mask.bool().tolist() == mask.tolist()
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.mask_token_id) == (tokens.eos, tokens.pad, tokens.mask)
    tgt = torch.tensor([[tokens.eos, *tok.encode("the end")]] * 2)
    with torch.no_grad():
        ref = ours(src, tgt, src_mask=mask)[0]
        assert (hf(**batch, decoder_input_ids=tgt).logits - ref).abs().max() <= ATOL
        # generate with the folder's defaults is our greedy decoding.
        mine = _greedy(ours, src, mask, tokens, 24)
        assert hf.generate(**batch).tolist() == mine
        assert [len(row) for row in mine] == [24, 24]  # max_length = block_size, the start token included
        # And back: the folder is a run wherever one is accepted.
        back = load_run(out)
        assert back.task == "seq2seq" and (back.model(src, tgt, src_mask=mask)[0] - ref).abs().max() <= ATOL


def test_a_trained_encoder_decoder_run_round_trips_through_export_and_import(tmp_path):
    pairs = [("the fox", "fox the"), ("lazy dog", "dog lazy"), ("the end", "end the"), ("said fox", "fox said")]
    tok = Tokenizer.train_bpe([TEXT], 300)
    tokens = Seq2SeqTokens.of(tok)
    cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "vocab_size": tok.vocab_size, "n_embd": 32,
                                  "block_size": 16})
    torch.manual_seed(0)
    model = build_model(cfg)
    sources, targets, _, _ = encode_pairs(tok, [s for s, _ in pairs], [t for _, t in pairs], 16, tokens)
    src, src_mask, tgt, labels = collate_pairs(sources, targets, tokens.pad)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):  # from scratch, on the framing the trainers use
        loss = model(src, tgt, labels, src_mask=src_mask)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    model.eval()
    run = _write_run(tmp_path / "run", model, tok)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    finetuned = _write_run(tmp_path / "finetuned", model, tok, finetuned=True)  # a seq2seq fine-tuning run: the same
    assert main(["export", str(finetuned), "--out", str(tmp_path / "hf-finetuned")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back")
    assert rundir.read_run_info(tmp_path / "back").task == "seq2seq" == back.task
    assert back.tokenizer.encode(TEXT) == tok.encode(TEXT) and back.model.cfg.n_decoder_layer == cfg.n_decoder_layer
    with torch.no_grad():
        ref = model(src, tgt, src_mask=src_mask)[0]
        assert (back.model(src, tgt, src_mask=src_mask)[0] - ref).abs().max() <= ATOL
        mine = _greedy(model, src, src_mask, tokens, 16)
        for folder in ("hf", "hf-finetuned"):
            hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / folder).eval()
            assert hf.generate(src, attention_mask=src_mask).tolist() == mine
    assert all(tokens.eos in row[1:] for row in mine)  # trained: each stops where it learned to, then pads


def test_in_memory_conversion_both_ways_keeps_logits_and_greedy_output():
    """What lmforge's own generation compares against: from_hf_model / to_hf_model, with set_seq2seq_generation."""
    tok = Tokenizer.train_char([TEXT])
    tokens = Seq2SeqTokens.of(tok)
    ours = _our_seq2seq(tok)
    hf = to_hf_model(ours)
    set_seq2seq_generation(hf, tokens, ours.cfg.block_size)
    src, mask, tgt = _batch(tok.vocab_size, tokens.pad)
    with torch.no_grad():
        ref = ours(src, tgt, src_mask=mask)[0]
        assert (hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits - ref).abs().max() <= ATOL
        again = from_hf_model(hf)
        assert isinstance(again, EncoderDecoder) and (again(src, tgt, src_mask=mask)[0] - ref).abs().max() <= ATOL
        assert hf.generate(src, attention_mask=mask).tolist() == _greedy(ours, src, mask, tokens, 24)


@pytest.mark.parametrize(("change", "expected"), [
    ({"scale_embedding": True}, "BART scale_embedding=true is not supported"),
    ({"decoder_attention_heads": 8}, "BART encoder_attention_heads=16 and decoder_attention_heads=8 differ"),
    ({"decoder_ffn_dim": 64}, "BART encoder_ffn_dim=4096 and decoder_ffn_dim=64 differ"),
    ({"activation_function": "relu"}, "BART activation_function 'relu' is not supported"),
    ({"add_bias_logits": True}, "BART add_bias_logits=true is not supported"),
    ({"normalize_before": True}, "BART normalize_before=true is not supported"),
    ({"add_final_layer_norm": True}, "BART add_final_layer_norm=true is not supported"),
    ({"tie_word_embeddings": False}, "BART tie_word_embeddings=false is not supported"),
    ({"architectures": ["BartForSequenceClassification"]}, "BART architecture 'BartForSequenceClassification' is"),
])
def test_bart_configs_we_cannot_compute_are_refused_in_one_line_naming_why(change, expected):
    with pytest.raises(UserError, match=expected) as e:
        config_from_hf(transformers.BartConfig(**change))
    assert "\n" not in str(e.value)
    cfg = config_from_hf(transformers.BartConfig(encoder_layers=2, decoder_layers=3))
    assert (cfg.arch, cfg.n_layer, cfg.decoder_layers, cfg.block_size, cfg.mlp) == ("encoder_decoder", 2, 3, 1024,
                                                                                    "gelu")


def test_an_encoder_decoder_transformers_or_llama_cpp_cannot_load_is_refused_in_one_line(tmp_path, capsys):
    tok = Tokenizer.train_char([TEXT])
    Seq2SeqTokens.of(tok)
    eps = _our_seq2seq(tok, norm_eps=1e-6)
    with pytest.raises(UserError, match=r"model.norm_eps=1e-06: BART's LayerNorms have eps 1e-05"):
        hf_config(eps.cfg)
    rope = _our_seq2seq(tok, pos_embedding="rope")
    run = _write_run(tmp_path / "run", rope, tok)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{rope.cfg.export_problem()}, so transformers cannot load it" in err
    bart = _write_run(tmp_path / "bart", _our_seq2seq(tok), tok)
    assert main(["export", str(bart), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an encoder-decoder (model.arch=encoder_decoder): GGUF files hold " \
                                          "decoders" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bart", "run"]
