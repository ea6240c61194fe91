"""lm-evaluation-harness runs end to end through the registered `lmforge` model on local tasks, and
its log-likelihoods equal `lmforge eval`'s."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lmforge.evaluate import lm, tasks  # noqa: E402
from lmforge.examples import HARNESS_TASK  # noqa: E402
from lmforge.loading import load_run  # noqa: E402
from tests.fixtures import HANG_S  # noqa: E402

ROLLING = """
task: lmforge_facts_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""

GENERATE = """
task: lmforge_colors_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
"""


def test_lm_eval_runs_through_the_registered_model_and_matches_lmforge_eval(memorised, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import lmforge.evaluate.harness  # noqa: F401 - registers the model name "lmforge"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run_dir, folder = memorised
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": line}) + "\n"
                             for line in (folder / "facts.txt").read_text().splitlines()[:6]))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": r["context"], "reference": r["choices"][r["label"]] + "."}) + "\n"
                           for r in map(json.loads, (folder / "mc.jsonl").read_text().splitlines()[:4])))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "colors.yaml").write_text(HARNESS_TASK.format(name="lmforge_colors", mc=folder / "mc.jsonl"))
    (task_dir / "ppl.yaml").write_text(ROLLING.format(texts=texts))
    (task_dir / "gen.yaml").write_text(GENERATE.format(gen=gen))

    out = simple_evaluate(model="lmforge", model_args=f"path={run_dir},batch_size=4,precision=fp32",
                          tasks=["lmforge_colors", "lmforge_facts_ppl", "lmforge_colors_gen"],
                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    assert out["results"]["lmforge_colors"]["acc,none"] == 1.0
    assert out["results"]["lmforge_colors_gen"]["exact_match,none"] == 1.0

    run = load_run(run_dir)
    for sample in out["samples"]["lmforge_colors"]:
        doc = sample["doc"]
        ours = tasks.loglikelihoods(run.model, [tasks.split_encode(run.tokenizer, doc["context"], c)
                                                for c in doc["choices"]])
        theirs = [r[0][0] for r in sample["resps"]]
        assert theirs == pytest.approx([ll for ll, _ in ours], abs=1e-5)
    for sample in out["samples"]["lmforge_facts_ppl"]:
        text = sample["doc"]["text"]
        ours = lm.score_texts(run.model, run.tokenizer, iter([("t", iter([text]))]))
        assert sample["resps"][0][0] == pytest.approx(-ours.nll, abs=1e-5)


def test_the_lm_eval_command_line_finds_the_lmforge_model(memorised, tmp_path):
    import os
    import subprocess
    import sys

    run_dir, folder = memorised
    (tmp_path / "colors.yaml").write_text(HARNESS_TASK.format(name="lmforge_colors", mc=folder / "mc.jsonl"))
    result = subprocess.run([sys.executable, "-m", "lmforge", "lm-eval", "run", "--model", "lmforge", "--model_args",
                             f"path={run_dir}", "--tasks", "lmforge_colors", "--include_path", str(tmp_path)],
                            capture_output=True, text=True, timeout=HANG_S,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("|lmforge_colors"))
    assert "|acc   |" in row and "|    1|" in row
