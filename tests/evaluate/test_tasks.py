"""Task metrics equal the reference libraries' own numbers; multiple choice finds memorised facts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.evaluate import tasks
from tests.evaluate.memorised import FACTS
from tests.fixtures import HANG_S, tiny_model

HYPS = ["the cat sat on the mat", "a quick brown dog", "hello world", "it rains"]
REFS = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox"], ["hello world"],
        ["it is raining", "rain falls"]]


def test_generation_metrics_equal_sacrebleu_and_rouge_score_called_directly():
    import sacrebleu
    from rouge_score import rouge_scorer

    m = tasks.generation_metrics(HYPS, REFS)
    streams = [[r[min(i, len(r) - 1)] for r in REFS] for i in range(2)]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        direct = sum(scorer.score_multi(r, h)[key].fmeasure for h, r in zip(HYPS, REFS, strict=True)) / len(HYPS)
        assert m[key] == pytest.approx(100 * direct)
    assert m["exact_match"] == pytest.approx(25.0)  # "hello world"
    single = tasks.generation_metrics(["a b c d"], [["a b c d"]])
    assert single["bleu"] == pytest.approx(100.0) and single["rougeL"] == pytest.approx(100.0)


@pytest.mark.parametrize("hyp, refs, em, f1", [
    ("The Cat sat.", ["a cat sat"], 1.0, 1.0),  # case, punctuation and articles do not count
    ("the number of words", ["the number of words in text"], 0.0, 2 * 1 * 0.6 / 1.6),  # P 3/3, R 3/5
    ("None", ["'None'", "False"], 1.0, 1.0),  # the best reference
    ("", ["x"], 0.0, 0.0),
    ("red red", ["red"], 0.0, 2 * 0.5 * 1 / 1.5),  # tokens are counted (a multiset), not a set
])
def test_squad_scores_follow_the_squad_v1_script(hyp, refs, em, f1):
    assert tasks.squad_scores(hyp, refs) == (em, pytest.approx(f1))


def test_loglikelihoods_equal_a_full_forward_pass_and_flag_greedy_continuations():
    model = tiny_model()
    ctx, cont = [3, 4, 5, 6], [7, 8, 9]
    (ll, greedy), = tasks.loglikelihoods(model, [(ctx, cont)])
    logp = F.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0][0], -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expected, rel=1e-5)
    argmax = logp.argmax(-1)[len(ctx) - 1:].tolist()
    assert greedy == (argmax == cont)
    (_, greedy_true), = tasks.loglikelihoods(model, [(ctx, argmax[:1])])
    assert greedy_true


def test_multiple_choice_is_perfect_on_memorised_facts_and_not_on_wrong_labels(memorised):
    from lmforge.loading import load_run

    run_dir, folder = memorised
    run = load_run(run_dir)
    right = tasks.multiple_choice(run.model, run.tokenizer, tasks.read_choice_task(str(folder / "mc.jsonl")))
    wrong = tasks.multiple_choice(run.model, run.tokenizer, tasks.read_choice_task(str(folder / "mc_shuffled.jsonl")))
    assert right["accuracy"] == 1.0 and right["chance"] == pytest.approx(1 / 3)
    assert wrong["accuracy"] == 0.0  # every shuffled label points at a wrong colour


def test_choices_longer_than_the_context_are_counted_and_warned_about_once():
    from lmforge.data.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ?"])
    model = tiny_model(vocab_size=tok.vocab_size, block_size=16)
    short = ("is it a or b?", [" a", " b"], 0)
    items = [short, ("a long question " * 3 + "?", [" a", " b"], 1), ("why?", [" a", "b" * 20], 0), short]
    with pytest.warns(UserWarning, match=r"^2 of 4 questions have a context \+ choice longer") as caught:
        result = tasks.multiple_choice(model, tok, items)
    assert len(caught) == 1 and result["truncated_questions"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every question fits: no warning
        assert tasks.multiple_choice(model, tok, [short] * 2)["truncated_questions"] == 0


def _lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=HANG_S)


def test_eval_command_writes_one_json_report_for_every_evaluation(memorised, tmp_path):
    run_dir, folder = memorised
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": f"the color of {n} is", "reference": f" {c}."}) + "\n"
                           for n, c in list(FACTS.items())[:4]))
    out = tmp_path / "report.json"
    result = _lmforge("eval", str(run_dir), "--lm", str(folder / "facts.txt"), "--dataset", str(run_dir / "data"),
                      "--choice", str(folder / "mc.jsonl"), "--generate", str(gen), "--stop", "\n", "-n", "12",
                      "-o", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"lm", "dataset", "choice", "generate"}
    assert res["lm"]["bits_per_byte"] < 1.0 and len(res["lm"]["data_sha256"]) == 64
    assert res["choice"]["accuracy"] == 1.0 and res["choice"]["truncated_questions"] == 0
    assert res["generate"]["exact_match"] == 100.0  # memorised: " red." etc.
    assert "bits_per_byte" in result.stdout and str(out) in result.stdout


def test_eval_user_mistakes_are_one_line_errors(memorised, tmp_path):
    run_dir, folder = memorised
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "a", "choices": ["x"]}\n')
    for args, fragment in ((["--choice", str(bad)], "bad.jsonl:2"),
                           (["--lm", str(tmp_path / "missing.txt")], "missing.txt"),
                           (["--classify", str(bad)], "classification run")):
        result = _lmforge("eval", str(run_dir), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_continuation_must_not_be_empty():
    with pytest.raises(UserError, match="empty continuation"):
        tasks.loglikelihoods(tiny_model(), [([1, 2], [])])


def test_classification_metrics_are_macro_averaged_with_a_confusion_matrix():
    m = tasks.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert m["accuracy"] == pytest.approx(0.6)
    # per class precision 1/2, 2/3, 0; recall 1/2, 1, 0
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_eval_with_nothing_asked_scores_the_runs_own_val_split(memorised, tmp_path):
    from lmforge.config import load_train_config
    from lmforge.evaluate.runner import EvalRequest, evaluate_run

    run_dir, _ = memorised
    own = load_train_config(run_dir / "config.yaml").data.dataset_dir
    report = evaluate_run(str(run_dir), EvalRequest(), progress=False)
    assert report["results"]["dataset"] == evaluate_run(str(run_dir), EvalRequest(dataset=own),
                                                        progress=False)["results"]["dataset"]
    moved = tmp_path / "run"  # a copy whose dataset is gone
    shutil.copytree(run_dir, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(own, str(tmp_path / "gone")))
    with pytest.raises(UserError, match="nothing to evaluate: .* names no prepared dataset of its own"):
        evaluate_run(str(moved), EvalRequest(), progress=False)
