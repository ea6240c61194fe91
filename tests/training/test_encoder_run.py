"""Pretraining an encoder (model.arch=encoder) end to end, and the commands that do not apply to one saying so in one
line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.tokenizer import Tokenizer
from lmforge.rundir import read_run_info

ARGS = ["model.preset=bert-tiny", "model.block_size=32", "train.batch_size=8", "train.max_steps=40",
        "train.log_interval=10", "train.eval_interval=20", "train.eval_batches=2", "optim.warmup_steps=5",
        "optim.lr=3e-3", "train.precision=fp32", "sample.num_samples=2"]


@pytest.fixture(scope="module")
def encoder_run(dataset, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("enc") / "run"
    with pytest.MonkeyPatch.context() as mp:
        out = []
        mp.setattr("builtins.print", lambda *a, **k: out.append(" ".join(map(str, a))))
        assert main(["train", f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS]) == 0
    return run, "\n".join(out)


def test_an_encoder_learns_to_fill_masks_and_its_run_says_what_it_is(encoder_run):
    run, out = encoder_run
    assert read_run_info(run).task == "mlm"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    final = [r for r in records if r["kind"] == "eval"][-1]
    # Characters of json/__init__.py (vocabulary 71 + 4 special): chance is 1.3% right at a loss of ln 75 = 4.3;
    # the most common character (space) is 21% of them. Measured here after 40 steps: 24% right, val loss 3.2, train
    # loss 3.88 (steps 1-10) -> 3.43.
    assert train[-1] < train[0] - 0.3 and final["val_loss"] < 3.6 and final["val_mlm_accuracy"] > 0.15
    assert "fill-mask sample 2" in out and "masked tokens right" in out
    assert Tokenizer.from_file(run / "tokenizer.json").token_to_id("[MASK]") is not None


def test_eval_repeats_the_final_evaluation_and_adds_pseudo_perplexity(encoder_run, tmp_path):
    run, _ = encoder_run
    assert main(["eval", str(run), "-o", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())["results"]["dataset"]
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r["kind"] == "eval"][-1]
    # The same batches and masks; the sums' last bits differ between the processes (measured: 5e-6 relative).
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert result["mlm_accuracy"] == pytest.approx(final["val_mlm_accuracy"], abs=0.01)
    assert 1 < result["pseudo_perplexity"] < 40 and result["pseudo_perplexity_tokens"] > 100


@pytest.mark.parametrize(("command", "says"), [
    (["generate", "{run}", "-p", "x"], "is an encoder (model.arch=encoder)"),
    (["chat", "{run}"], "is an encoder (model.arch=encoder)"),
    (["serve", "{run}"], "is an encoder (model.arch=encoder)"),
    (["eval", "{run}", "--lm", "{run}/config.yaml"], "--lm, --generate and --choice score or write text"),
    (["export", "{run}", "--out", "{tmp}/x.gguf", "--format", "gguf"], "GGUF files hold decoders"),
    (["finetune", "base={run}", "data.train={run}/config.yaml", "out_dir={tmp}/ft"], "so task=sft does not apply"),
    (["compare", "{run}", "--bpb", "--png", "{tmp}/c.png"], "its masked-LM loss is no code length of the text"),
])
def test_what_does_not_apply_to_an_encoder_says_so_in_one_line(encoder_run, tmp_path, capsys, command, says):
    run, _ = encoder_run
    assert main([c.format(run=run, tmp=tmp_path) for c in command]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err, err


def test_a_sweep_over_what_only_a_decoder_uses_is_refused(dataset, tmp_path):
    from lmforge.errors import UserError
    from lmforge.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(f"overrides: [model.arch=encoder, model.preset=bert-tiny, data.dataset_dir={dataset}]\n"
                    "space:\n  sample.temperature: {type: float, low: 0.5, high: 1.0}\n")
    with pytest.raises(UserError, match="space key 'sample.temperature' changes what a decoder writes"):
        load_sweep(str(path))
    path.write_text(f"overrides: [model.preset=bert-tiny, data.dataset_dir={dataset}]\nmetric: val_bpb\n"
                    "space:\n  optim.lr: {type: float, low: 0.0001, high: 0.01}\n")
    with pytest.raises(UserError, match="metric 'val_bpb' is not one encoder train trials report"):
        load_sweep(str(path))


def test_an_encoder_classifies_with_lora_and_its_merged_run_predicts_what_its_evaluation_scored(encoder_run, tmp_path):
    import csv
    import keyword

    from lmforge.evaluate.predict import label_probabilities
    from lmforge.loading import load_run
    from lmforge.model.encoder import Encoder

    run, _ = encoder_run
    # Words of this file's own kind: Python keywords against other identifiers (a real, local two-class task).
    words = sorted({w for w in Path(__file__).read_text().replace("(", " ").replace(".", " ").split() if w.isalpha()})
    rows = [{"text": w, "label": "keyword" if keyword.iskeyword(w) else "name"} for w in words]
    rows += [{"text": k, "label": "keyword"} for k in keyword.kwlist]
    path = tmp_path / "words.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("text", "label"))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "cls"
    assert main(["finetune", "task=classify", f"base={run}", f"data.train={path}", "lora.rank=4", "--merge",
                 "train.max_steps=10", "train.batch_size=8", "train.precision=fp32", f"out_dir={out}"]) == 0
    final = json.loads((out / "final_eval.json").read_text())
    loaded = load_run(out)
    assert isinstance(loaded.model.backbone, Encoder) and loaded.model.score.bias is not None
    from lmforge.data.records import ReadReport, read_train_val

    d = loaded.config.data
    _, val = read_train_val(str(path), None, d.val_fraction, d.seed, lambda r: (r["text"], r["label"]), False,
                            ReadReport())
    predicted = label_probabilities(loaded, [t for (t, _), _ in val])[0].argmax(-1).tolist()
    truth = [loaded.labels.index(label) for (_, label), _ in val]
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(val) == pytest.approx(
        final["val_accuracy"])
