"""Language-modelling evaluation: perplexity as transformers computes it, bits per byte as training
reports it, and the streaming reader changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.evaluate import lm
from lmforge.loading import load_run

transformers = pytest.importorskip("transformers")

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom,\n"
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n") * 6


def _hf_folder(tmp_path):
    tok = Tokenizer.train_char([TEXT])
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save(tmp_path / "hf" / "tokenizer.json")
    return hf, tok, tmp_path / "hf"


def _transformers_ppl(hf, ids: list[int], block: int, stride: int) -> float:
    """The sliding-window perplexity recipe of the transformers docs, with transformers' own loss."""
    seq = torch.tensor([ids])
    nll, count, scored_to, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + block + 1, len(ids))
        x = seq[:, begin:end - 1]
        labels = seq[:, begin + 1:end].clone()
        labels[:, :scored_to - begin - 1] = -100  # already scored by an earlier window
        n = int((labels != -100).sum())
        with torch.no_grad():
            logits = hf(x).logits
        nll += torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum").item()
        count += n
        scored_to = end
        if end == len(ids):
            break
        begin += stride
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [32, 12])
def test_perplexity_matches_transformers_for_the_same_windows(tmp_path, stride):
    hf, tok, folder = _hf_folder(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    run = load_run(folder)
    ours = lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "t.txt")]), stride=stride)
    ids = [tok.eot_id] + tok.encode(TEXT)
    ref = _transformers_ppl(hf, ids, block=32, stride=stride)
    assert ours.tokens == len(ids) - 1  # every token of the text scored once
    assert ours.as_dict()["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert ours.bytes == len(TEXT.encode())


def test_reading_in_small_pieces_gives_the_same_result(tmp_path, monkeypatch):
    _, _, folder = _hf_folder(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    run = load_run(folder)
    whole = lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "t.txt")]), stride=16)
    monkeypatch.setattr(lm, "PIECE_BYTES", 50)
    pieces = list(lm._file_pieces(tmp_path / "t.txt"))
    assert len(pieces) > 10 and "".join(pieces) == TEXT
    small = lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "t.txt")]), stride=16)
    assert small.tokens == whole.tokens
    assert small.nll == pytest.approx(whole.nll, rel=1e-6)


def test_jsonl_records_are_separate_documents(tmp_path):
    _, _, folder = _hf_folder(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "it was the age"}\n{"text": "of wisdom"}\n')
    run = load_run(folder)
    score = lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "d.jsonl")]))
    assert score.documents == 2 and score.tokens == len("it was the age") + len("of wisdom")


def test_empty_input_and_bad_stride_are_user_errors(tmp_path):
    _, _, folder = _hf_folder(tmp_path)
    (tmp_path / "e.txt").write_text("")
    run = load_run(folder)
    with pytest.raises(UserError, match="empty"):
        lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "e.txt")]))
    (tmp_path / "t.txt").write_text(TEXT)
    with pytest.raises(UserError, match="--stride"):
        lm.score_texts(run.model, run.tokenizer, lm.documents([str(tmp_path / "t.txt")]), stride=33)


def test_bits_per_byte_on_the_val_split_equal_what_training_reported(tmp_path):
    import json

    from lmforge.config import load_train_config
    from lmforge.runtime import setup_runtime
    from lmforge.training.pretrain import train

    (tmp_path / "corpus.txt").write_text(TEXT * 5)
    result = train(load_train_config(None, [f"data.sources=[{tmp_path / 'corpus.txt'}]", "data.tokenizer=char",
                                            f"out_dir={tmp_path / 'run'}", "model.preset=gpt2-tiny", "model.n_layer=1",
                                            "model.block_size=32", "train.max_steps=20", "train.eval_interval=20",
                                            "sample.num_samples=0", "data.val_fraction=0.2",
                                            "train.precision=fp32"]), progress=False)
    run = load_run(result.run_dir)
    # Both in fp32: with 'auto', training measures its model's step and eval the GEMMs, and on a host where bf16
    # is near the threshold the two can choose differently (1.3e-5 relative apart on an AVX512-BF16 EPYC).
    ours = lm.score_split(run.model, result.run_dir / "data", setup_runtime("cpu", "fp32"))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = [r for r in records if r["kind"] == "eval"][-1]
    assert ours["bits_per_byte"] == pytest.approx(reported["val_bpb"], rel=1e-5)
    assert ours["loss"] == pytest.approx(result.val_loss, rel=1e-5)
