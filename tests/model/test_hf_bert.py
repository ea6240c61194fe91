"""BERT both ways (lmforge.model.hf's BERT table, lmforge.interop's folders): tiny random `transformers` BERT folders
import as our Encoder (or a SequenceClassifier on one) with their outputs, and our encoder runs export as folders
that `transformers` loads with ours; all checked against `transformers` itself, no hub access."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import rundir  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import FinetuneConfig, ModelConfig, TrainConfig, from_dict, save_yaml  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loading import load_run  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.model.classifier import SequenceClassifier  # noqa: E402
from lmforge.model.encoder import Encoder  # noqa: E402
from lmforge.model.hf import config_from_hf  # noqa: E402
from lmforge.training.checkpoint import save_weights_only  # noqa: E402
from tests.fixtures import save_hf_folder  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. The end, said the fox!"
# fp32 on both sides; measured up to ~7e-7 here (the kernels differ: sdpa with a padding mask, GELU, LayerNorm).
ATOL = 1e-4


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """transformers starts biases at zero and norms at one: make every weight count."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf_bert(cls: str, tie: bool = True, **kw) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                                  tie_word_embeddings=tie, architectures=[cls], **kw)
    torch.manual_seed(0)
    return _perturbed(getattr(transformers, cls)(cfg))


def _batch(vocab: int, lengths: tuple[int, int] = (12, 8)) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, token types, lengths): the second row right-padded, both of two segments."""
    T = max(lengths)
    ids = torch.randint(5, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = (torch.arange(T)[None, :] >= 5).long().expand(2, -1).contiguous()
    return ids, mask, types, torch.tensor(lengths)


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForMaskedLM-untied", "BertModel",
                                  "BertForSequenceClassification"])
def test_a_bert_folder_loads_as_our_encoder_with_its_outputs(name, tmp_path):
    cls, tie = name.removesuffix("-untied"), not name.endswith("-untied")
    labels = {0: "neg", 1: "pos", 2: "neutral"}
    extra = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if "Classification" in cls else {}
    hf = _hf_bert(cls, tie, **extra)
    save_hf_folder(hf, tmp_path / "hf", Tokenizer.train_wordpiece([TEXT], 99))
    run = load_run(tmp_path / "hf")
    ids, mask, types, lengths = _batch(99)
    with torch.no_grad():
        if cls == "BertForSequenceClassification":
            assert (run.task, run.labels) == ("classify", ["neg", "pos", "neutral"])
            assert isinstance(run.model, SequenceClassifier) and run.model.backbone.cfg.pooler
            assert (run.model(ids, lengths) - hf(ids, attention_mask=mask).logits).abs().max() <= ATOL
            return
        assert run.task == "mlm" and run.labels is None and isinstance(run.model, Encoder)
        model = run.model
        assert model.cfg.standard_family == "bert" and model.cfg.tie_embeddings == tie
        if cls == "BertModel":  # no masked-LM head in the folder: ours is fresh, tied to the embedding
            out = hf(ids, attention_mask=mask, token_type_ids=types)
            h = model.hidden_states(ids, attention_mask=mask, token_types=types)
            assert (h - out.last_hidden_state).abs().max() <= ATOL
            assert (torch.tanh(model.pooler(h[:, 0])) - out.pooler_output).abs().max() <= ATOL
            assert model.lm_head.weight is model.wte.weight
            return
        assert model.pooler is None  # BertForMaskedLM has none
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        assert (model(ids, attention_mask=mask, token_types=types)[0] - ref).abs().max() <= ATOL


def _write_run(folder, model: Encoder | SequenceClassifier, tok: Tokenizer, labels: list[str] | None = None):
    """``model`` as an lmforge run: an encoder's pretraining run, or a classification run on one (as `lmforge
    finetune` writes them, its weights full)."""
    folder.mkdir()
    if labels is None:
        save_yaml(TrainConfig(out_dir=str(folder), model=model.cfg), folder / rundir.CONFIG)
        rundir.write_run_info(folder, "pretrain", "mlm")
    else:
        save_yaml(FinetuneConfig(task="classify", base="base", out_dir=str(folder), model=model.backbone.cfg),
                  folder / rundir.CONFIG)
        rundir.save_labels(folder, labels)
        rundir.write_run_info(folder, "finetune", "classify")
    tok.save(folder / rundir.TOKENIZER)
    save_weights_only(folder, 1, model)
    return folder


def _our_encoder(tok: Tokenizer, **kw) -> Encoder:
    cfg = from_dict(ModelConfig, {"preset": "bert-tiny", "vocab_size": tok.vocab_size, "n_embd": 32,
                                  "block_size": 64, **kw})
    torch.manual_seed(0)
    return _perturbed(build_model(cfg))


def test_an_encoder_run_exports_as_bert_for_masked_lm_with_its_tokenizer(tmp_path, capsys):
    tok = Tokenizer.train_wordpiece([TEXT], 99)
    ours = _our_encoder(tok)
    run, out = _write_run(tmp_path / "run", ours, tok), tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "AutoModelForMaskedLM.from_pretrained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("bert", ["BertForMaskedLM"])
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask, types, _ = _batch(tok.vocab_size)
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask, token_types=types)[0]
        assert (hf(ids, attention_mask=mask, token_type_ids=types).logits - ref).abs().max() <= ATOL
        # And back: the folder is a run wherever one is accepted.
        back = load_run(out)
        assert back.task == "mlm"
        assert (back.model(ids, attention_mask=mask, token_types=types)[0] - ref).abs().max() <= ATOL
    # BERT's tokenizer files: [CLS] text [SEP] with segment ids, and vocab.txt in id order (WordPiece).
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    marks = tok.encoder_tokens()
    pair = hf_tok("the lazy fox", "the end")
    assert pair.input_ids == [marks.cls, *tok.encode("the lazy fox"), marks.sep, *tok.encode("the end"), marks.sep]
    assert pair.token_type_ids == [0] * (len(tok.encode("the lazy fox")) + 2) + [1] * (len(tok.encode("the end")) + 1)
    assert (hf_tok.mask_token_id, hf_tok.pad_token_id) == (marks.mask, marks.pad)
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert [tok.token_to_id(t) for t in vocab] == list(range(tok.vocab_size))


def test_a_classification_run_on_an_encoder_exports_as_bert_for_sequence_classification(tmp_path, capsys):
    tok = Tokenizer.train_char([TEXT])  # no WordPiece: no vocab.txt, the encoder's special tokens added after it
    marks = tok.encoder_tokens()
    classifier = _perturbed(SequenceClassifier(_our_encoder(tok), 3))  # the head's weights and bias random too
    labels = ["eggs", "ham", "spam"]
    run, out = _write_run(tmp_path / "run", classifier, tok, labels), tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.architectures == ["BertForSequenceClassification"]
    assert hf.config.id2label == dict(enumerate(labels)) and hf.config.num_labels == 3
    assert not (out / "vocab.txt").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["the lazy dog", "fox"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    ids, lengths = batch.input_ids, batch.attention_mask.sum(-1)
    assert ids[1, :6].tolist() == [marks.cls, *tok.encode("fox"), marks.sep, marks.pad]  # framed and padded as ours
    with torch.no_grad():
        ref = classifier(ids, lengths)
        logits = hf(**batch).logits
        assert (logits - ref).abs().max() <= ATOL and logits.argmax(-1).tolist() == ref.argmax(-1).tolist()
        back = load_run(out)
        assert (back.task, back.labels) == ("classify", labels)
        assert (back.model(ids, lengths) - ref).abs().max() <= ATOL


def test_an_encoder_transformers_cannot_load_is_refused_in_one_line_naming_what_it_lacks(tmp_path, capsys):
    tok = Tokenizer.train_wordpiece([TEXT], 99)
    rope = _our_encoder(tok, pos_embedding="rope")
    run, out = _write_run(tmp_path / "run", rope, tok), tmp_path / "out"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{rope.cfg.export_problem()}, so transformers cannot load it" in err
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF files hold decoders" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(("change", "expected"), [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key' is not supported"),
    ({"architectures": ["BertForQuestionAnswering"]}, "BERT architecture 'BertForQuestionAnswering' is not supp"),
    ({"hidden_act": "relu"}, "BERT hidden_act 'relu' is not supported"),
    ({"is_decoder": True}, "BERT as a decoder"),
])
def test_bert_configs_we_cannot_compute_are_refused_naming_why(change, expected):
    with pytest.raises(UserError, match=expected):
        config_from_hf(transformers.BertConfig(**change))
    cfg = config_from_hf(transformers.BertConfig(hidden_act="gelu_new"))
    assert (cfg.mlp, cfg.norm_eps, cfg.type_vocab_size, cfg.block_size) == ("gelu_tanh", 1e-12, 2, 512)
