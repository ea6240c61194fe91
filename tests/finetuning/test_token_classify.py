"""Token classification fine-tuning (task=token_classify): Python source lines tagged word by word with their token
type, on a small encoder base (and a decoder one under LoRA)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.config import load_finetune_config
from lmforge.data.tokenizer import Tokenizer
from lmforge.data.words import encode_words
from lmforge.errors import UserError
from lmforge.evaluate.options import PredictOptions
from lmforge.evaluate.predict import predict_command
from lmforge.evaluate.tasks import classification_metrics
from lmforge.finetuning.finetune import finetune
from lmforge.finetuning.token_classify import IGNORE, word_targets
from lmforge.loading import LoadedRun, load_run
from lmforge.model.classifier import TokenClassifier, text_batch, word_logits
from lmforge.rundir import read_run_info, write_manifest
from tests.finetuning.tasks import write_python_tags, write_random_base

FAST = ["task=token_classify", "train.batch_size=8", "optim.lr=2e-3", "optim.warmup_steps=5", "train.log_interval=50",
        "train.device=cpu", "train.precision=fp32"]
"""fp32: the loaded run (fp32) must predict exactly what the run's final evaluation did."""


@pytest.fixture(scope="module")
def python_tags(tmp_path_factory) -> tuple[Path, Path]:
    return write_python_tags(tmp_path_factory.mktemp("tags"))


@pytest.fixture(scope="module")
def encoder_base(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("bases") / "encoder", "bert-tiny")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _predicted(run: LoadedRun, records: list[dict]) -> tuple[list[int], list[list[int]]]:
    """(the records' tag ids, flat; the predicted ones per record), as fine-tuning and predict frame the words."""
    framed = run.config.model.arch == "encoder"
    encoded = [encode_words(run.tokenizer, r["tokens"], run.config.model.block_size, framed) for r in records]
    logits = word_logits(run.model, [x.ids for x in encoded], [x.firsts for x in encoded], run.tokenizer.pad_id(framed))
    gold = [run.labels.index(t) for r, x in zip(records, encoded, strict=True) for t in r["tags"][:len(x.firsts)]]
    return gold, [lg.argmax(-1).tolist() for lg in logits]


def test_a_word_is_tagged_at_its_first_subtoken_only():
    tokenizer = Tokenizer.train_char(["abc =d"])
    marks = tokenizer.encoder_tokens()
    a, b, c, eq, d = (tokenizer.token_to_id(ch) for ch in "abc=d")
    x = encode_words(tokenizer, ["abc", "=", "d"], 16, framed=True)  # 'abc': 3 sub-tokens, one tag
    assert x.ids == [marks.cls, a, b, c, eq, d, marks.sep] and x.firsts == [1, 4, 5] and not x.truncated
    assert word_targets(x, [7, 8, 9]) == [IGNORE, 7, IGNORE, IGNORE, 8, 9, IGNORE]
    plain = encode_words(tokenizer, ["abc", "=", "d"], 16, framed=False)  # a decoder's: no frame
    assert plain.ids == [a, b, c, eq, d] and word_targets(plain, [7, 8, 9]) == [7, IGNORE, IGNORE, 8, 9]
    cut = encode_words(tokenizer, ["abc", "=", "d"], 5, framed=True)  # room for 3 tokens: '=' and 'd' are cut
    assert cut.ids == [marks.cls, a, b, c, marks.sep] and cut.firsts == [1] and cut.truncated
    assert word_targets(cut, [7, 8, 9]) == [IGNORE, 7, IGNORE, IGNORE, IGNORE]


def test_an_encoder_learns_to_tag_and_its_loaded_run_predicts_as_its_final_evaluation(encoder_base, python_tags,
                                                                                      tmp_path, capsys):
    train_file, val_file = python_tags
    cfg = load_finetune_config(None, [*FAST, f"base={encoder_base}", f"data.train={train_file}",
                                      f"data.val={val_file}", f"out_dir={tmp_path / 'tags'}", "train.max_steps=60",
                                      "train.eval_interval=60"])
    result = finetune(cfg, progress=False)
    m = result.metrics
    matrix = torch.tensor(m["confusion_matrix"])
    majority = matrix.sum(1).max().item() / matrix.sum().item()  # OP, ~45% of textwrap.py's words
    assert m["val_accuracy"] >= majority + 0.3, (m["val_accuracy"], majority)  # measured 0.91 vs 0.45
    assert read_run_info(result.run_dir).task == "token_classify"

    run = load_run(result.run_dir)
    assert isinstance(run.model, TokenClassifier) and run.task == "token_classify"
    assert run.labels == ["COMMENT", "KEYWORD", "NAME", "NUMBER", "OP", "STRING"]
    val = _records(val_file)
    gold, predicted = _predicted(run, val)
    again = classification_metrics(gold, [t for p in predicted for t in p], len(run.labels))
    assert again["confusion_matrix"] == m["confusion_matrix"] and again["accuracy"] == m["val_accuracy"]

    # Padding changes nothing: a short text's logits alone and in a batch with a longer one.
    encoded = sorted((encode_words(run.tokenizer, r["tokens"], 128, True) for r in val[:20]), key=lambda e: len(e.ids))
    short, long = encoded[0], encoded[-1]
    x, lengths = text_batch([short.ids, long.ids], run.tokenizer.pad_id(True))
    with torch.no_grad():
        together = run.model(x, lengths)[0, :len(short.ids)]
        alone = run.model(torch.tensor([short.ids]), torch.tensor([len(short.ids)]))[0]
    assert len(short.ids) < len(long.ids)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)

    # `lmforge predict` tags each record's words as the run does, and scores them when they carry tags.
    subset, out = tmp_path / "subset.jsonl", tmp_path / "tagged.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in val[:10]))
    capsys.readouterr()
    predict_command(PredictOptions(run=str(result.run_dir), file=str(subset), output=str(out), text=["if x == 1 :"]))
    printed = capsys.readouterr().out
    rows = _records(out)
    assert rows[0] == {"tokens": ["if", "x", "==", "1", ":"], "tags": rows[0]["tags"]} and len(rows) == 11
    assert [[run.labels.index(t) for t in r["tags"]] for r in rows[1:]] == predicted[:10]
    assert "word accuracy" not in printed  # the --text record has no tags
    predict_command(PredictOptions(run=str(result.run_dir), file=str(subset)))
    assert "word accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(("record", "message"), [
    ({"tokens": "if x", "tags": ["KEYWORD", "NAME"]}, "field 'tokens' should be a list, got str"),
    ({"tokens": ["if", 1], "tags": ["KEYWORD", "NUMBER"]}, "field 'tokens' should be a list of strings; item 1 is"),
    ({"tokens": ["if", "x"], "tags": ["KEYWORD"]}, "2 words in 'tokens' but 1 tags in 'tags'"),
    ({"tokens": ["if", "x"]}, "missing field 'tags'"),
    ({"tokens": ["if", ""], "tags": ["KEYWORD", "NAME"]}, "word 1 ('') has no tokens"),
])
def test_a_bad_record_stops_with_one_line_naming_it(encoder_base, tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = {"tokens": ["x", "=", "1"], "tags": ["NAME", "OP", "NUMBER"]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, good, good, record)))
    cfg = load_finetune_config(None, [*FAST, f"base={encoder_base}", f"data.train={path}",
                                      f"out_dir={tmp_path / 'run'}", "train.max_steps=1"])
    with pytest.raises(UserError) as e:
        finetune(cfg, progress=False)
    assert str(e.value).startswith(f"{path}:4: {message}") and "\n" not in str(e.value), str(e.value)


def test_lora_on_a_decoder_base_loads_the_same_from_adapters_as_from_merged_weights(python_tags, tmp_path):
    train_file, val_file = python_tags
    base = write_random_base(tmp_path / "decoder", "gpt2-tiny")
    few = tmp_path / "few.jsonl"  # a few steps, a short evaluation: this checks the plumbing, not the learning
    few.write_text("".join(val_file.read_text().splitlines(keepends=True)[:40]))
    cfg = load_finetune_config(None, [*FAST, f"base={base}", f"data.train={train_file}", f"data.val={few}",
                                      f"out_dir={tmp_path / 'lora'}", "lora.rank=4", "lora.merge=true",
                                      "train.max_steps=5", "train.eval_interval=5"])
    result = finetune(cfg, progress=False)
    assert read_run_info(result.run_dir).lora and 0 <= result.metrics["val_accuracy"] <= 1
    adapters_only = tmp_path / "adapters_only"
    shutil.copytree(result.run_dir, adapters_only)
    (adapters_only / "checkpoints" / "step_000005" / "model.safetensors").unlink()
    write_manifest(adapters_only / "checkpoints" / "step_000005")  # as a run without lora.merge writes it
    merged, from_adapters = load_run(result.run_dir), load_run(adapters_only)
    assert isinstance(merged.model, TokenClassifier) and isinstance(from_adapters.model, TokenClassifier)
    x = torch.tensor([merged.tokenizer.encode("if x == 1:")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x, torch.tensor([x.size(1)])),
                                   from_adapters.model(x, torch.tensor([x.size(1)])), atol=1e-5, rtol=1e-5)
