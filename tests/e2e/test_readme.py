"""The README's tour and Python snippet, run as a new user would: every command in order, in a fresh
folder next to a `shared/data/tinyshakespeare.txt` (the real one when the checkout has it beside it).

Toy sizes, so that it takes a minute rather than hours, by one documented rewrite (:func:`toy`) of
the README's own text: training commands get TOY_MODEL/TOY_LOOP overrides appended (overrides mix
with flags in any order) and their ``train.max_steps=N`` divided by 1000; `generate -n` and `eval
--stride` shrink; lm-eval gets ``--limit``. A README edit that breaks a command breaks this test:
every command's arguments are parsed in the default run, the whole tour runs with `-m slow`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import lmforge.loading
import lmforge.training.pretrain
from lmforge.cli import parse
from lmforge.data.tokenizer import Tokenizer
from tests.fixtures import tiny_model

README = Path(__file__).resolve().parents[2] / "README.md"
SHAKESPEARE = README.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
TOY_MODEL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]
TOY_LOOP = ["train.batch_size=2", "train.eval_batches=1", "train.eval_interval=1000", "train.log_interval=1"]
TOY_SAMPLES = ["sample.num_samples=1", "sample.max_new_tokens=8"]


def _block(after: str, language: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```\n", start)]


def tour_commands() -> list[str]:
    """The tour's command lines, comments and blank lines left out."""
    return [line for line in _block("## A short tour", "bash").splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def python_snippet() -> str:
    return _block("From Python:", "python")


def _fewer_steps(line: str) -> str:
    return re.sub(r"train\.max_steps=(\d+)", lambda m: f"train.max_steps={max(2, int(m[1]) // 1000)}", line)


def toy(line: str) -> str:
    """A tour command at toy size (see the module docstring)."""
    words = shlex.split(line)
    if words[:2] == ["lmforge", "train"]:
        line = _fewer_steps(line)
        if "--resume" not in words:
            steps = [] if "train.max_steps=" in line else ["train.max_steps=2"]
            line += " " + " ".join(TOY_MODEL + TOY_LOOP + TOY_SAMPLES + steps)
    elif words[:2] == ["lmforge", "finetune"]:
        line += " " + " ".join(TOY_LOOP + ["train.max_steps=2"])
    elif words[:2] == ["lmforge", "generate"]:
        line = re.sub(r" -n \d+", " -n 8", line) + ("" if " -n " in line else " -n 8")
    elif words[:2] == ["lmforge", "eval"]:
        line = re.sub(r"--stride \d+", "--stride 16", line) + " --max-new-tokens 4"
    elif words[:2] == ["lmforge", "lm-eval"]:
        line += " --limit 5"
    return line


def test_every_tour_command_is_one_the_command_line_accepts():
    commands = tour_commands()
    assert len(commands) >= 15 and all(c.startswith("lmforge ") for c in commands), commands
    for line in commands:
        argv = shlex.split(line.replace("$'\\n\\n\\n'", "'x'"))[1:]  # ($'..' is bash's, not the parser's)
        if argv[0] == "lm-eval":
            continue  # lm-eval's own command line
        command, _options = parse(argv)
        assert command == argv[0], line
    assert "train(load_train_config(" in python_snippet()


@pytest.mark.slow
def test_the_tour_and_the_python_snippet_run_in_order_in_a_fresh_folder(tmp_path):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    if SHAKESPEARE.is_file():
        shutil.copyfile(SHAKESPEARE, shared / "tinyshakespeare.txt")
    else:  # a checkout without shared/: any text will do at toy size
        shared.joinpath("tinyshakespeare.txt").write_text(Path(shlex.__file__).read_text())
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    for line in tour_commands():
        result = subprocess.run(["bash", "-c", toy(line)], cwd=work, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{toy(line)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    snippet = python_snippet().replace('"train.max_steps=100"', ", ".join(
        f'"{o}"' for o in ["train.max_steps=2", *TOY_MODEL, *TOY_LOOP, *TOY_SAMPLES]))
    result = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet prints its greedy continuation"
    for made in ("runs/mine/loss.png", "runs/chat/run.json", "eval.json", "compare.png", "predictions.jsonl",
                 "hf_models/mine/config.json", "runs/api/checkpoints/latest"):
        assert (work / made).is_file(), made


def test_the_python_snippet_calls_the_api_as_it_is_today(monkeypatch, capsys):
    """The snippet, with training and loading stood in for by a tiny model: its calls match the API's signatures
    (the full run is the slow test above)."""
    tokenizer = Tokenizer.train_char(["import os, sys\n"])
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    monkeypatch.setattr(lmforge.training.pretrain, "train", lambda cfg, **_: SimpleNamespace(run_dir=cfg.out_dir))
    monkeypatch.setattr(lmforge.loading, "load_run", lambda path, *_a, **_k: SimpleNamespace(model=model,
                                                                                            tokenizer=tokenizer))
    exec(compile(python_snippet(), "README.md (From Python)", "exec"), {})
    assert capsys.readouterr().out.strip()
