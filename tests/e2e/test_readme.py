"""The README's tour, its sweep example and its Python snippet, run as a new user would: every command in order,
in a fresh folder outside the repository with nothing beside it (no `../shared`), only the installed `lmforge`
on PATH. The tour's step 0 (`lmforge examples tour`) writes every input the rest reads.

Toy sizes, so that it takes a few minutes rather than half an hour, by one documented rewrite (:func:`toy`,
:func:`toy_sweep`) of the README's own text: training commands get TOY_MODEL/TOY_LOOP overrides appended
(overrides mix with flags in any order) and their ``train.max_steps=N`` divided by 100; `generate -n` and `eval
--stride` shrink; lm-eval gets ``--limit``; the sweep file gets ``trials: 2`` and the same overrides appended to
its own. A README edit that breaks a command breaks this test: the default run parses every command and checks,
without running anything, that each path a command reads was written by an earlier one (the static check,
:func:`unmade_inputs`); the whole tour runs with `-m slow`.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import lmforge.loading
import lmforge.training.pretrain
from lmforge import examples
from lmforge.cli import parse
from lmforge.config import DEFAULT_RECIPE, TrainConfig, load_train_config, load_yaml, resolve_config_path
from lmforge.data.tokenizer import Tokenizer
from lmforge.sweep import SweepConfig, trial_config
from tests.fixtures import tiny_model

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TOY_MODEL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]
TOY_LOOP = ["train.batch_size=2", "train.eval_batches=1", "train.eval_interval=1000", "train.log_interval=1"]
TOY_SAMPLES = ["sample.num_samples=1", "sample.max_new_tokens=8"]
HARNESS_INSTALL = 'pip install -e ".[harness]"'
OUTPUT_FLAGS = ("--out", "-o", "--png", "--output")
"""The flags whose value a command writes (everything else path-like it reads)."""


def _block(after: str, language: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```\n", start)]


def _commands(block: str) -> list[str]:
    """A bash block's command lines, comments and blank lines left out, a trailing comment (after two spaces) cut."""
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [re.sub(r" {2,}#.*$", "", line) for line in lines]


def tour_commands() -> list[str]:
    """The tour's command lines."""
    return _commands(_block("## A short tour", "bash"))


def sweep_file() -> tuple[str, str]:
    """The sweep example: its file name (the block's first line, a comment) and text."""
    text = _block("## Hyper-parameter search", "yaml")
    return text.splitlines()[0].lstrip("# ").strip(), text


def sweep_commands() -> list[str]:
    """The commands under the sweep file."""
    return _commands(_block("```yaml\n# sweep.yaml", "bash"))


def python_snippet() -> str:
    return _block("From Python:", "python")


def _fewer_steps(line: str) -> str:
    return re.sub(r"train\.max_steps=(\d+)", lambda m: f"train.max_steps={max(2, int(m[1]) // 100)}", line)


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


def toy_sweep(text: str) -> str:
    """The sweep file at toy size (see the module docstring)."""
    data = yaml.safe_load(text)
    data["trials"] = 2
    data["overrides"] = [_fewer_steps(o) for o in data.get("overrides", [])] + TOY_MODEL + TOY_LOOP + TOY_SAMPLES
    return yaml.safe_dump(data)


def _looks_like_path(value: str) -> bool:
    return "/" in value or re.search(r"\.(txt|md|jsonl|json|csv|parquet|yaml|png|gguf)$", value) is not None


def _written(words: list[str]) -> list[str]:
    """What a tour command writes: the example files, an output flag's value, a run's or a sweep's folder."""
    if words[1] == "examples":
        return [posixpath.join(words[2], name) for name in examples.FILES]
    made = [w for flag, w in zip(words, words[1:], strict=False) if flag in OUTPUT_FLAGS]
    made += [w.split("=", 1)[1] for w in words if w.startswith("out_dir=")]
    if words[1] == "train" and "--resume" not in words and not made:  # the recipe's own out_dir
        recipe = words[words.index("-c") + 1] if "-c" in words else DEFAULT_RECIPE
        made.append(load_yaml(resolve_config_path(recipe))["out_dir"])
    if words[1] == "sweep" and "-c" in words and not made:  # sweeps/STUDY, the study named after the file
        study = words[words.index("--study") + 1] if "--study" in words else Path(words[words.index("-c") + 1]).stem
        made.append(f"sweeps/{study}")
    return made


def _read(words: list[str]) -> list[str]:
    """The path-like words (or key=value values, or comma-separated parts of them) a command does not write."""
    written = {w for flag, w in zip(words, words[1:], strict=False) if flag in OUTPUT_FLAGS}
    values = [v for w in words[2:] if w not in written and not w.startswith("out_dir=") for v in re.split(r"[=,]", w)]
    paths = [v for v in values if _looks_like_path(v)] + (_train_inputs(words) if words[1] == "train" else [])
    return list(dict.fromkeys(paths))


def _train_inputs(words: list[str]) -> list[str]:
    """The data a pretraining command reads, its recipe's included (a recipe's data.sources is a relative path)."""
    if "--resume" in words:
        return []
    recipe = words[words.index("-c") + 1] if "-c" in words else DEFAULT_RECIPE
    return _data_inputs(load_train_config(recipe, [w for w in words[2:] if "=" in w and not w.startswith("-")]))


def _data_inputs(cfg: TrainConfig) -> list[str]:
    return [cfg.data.dataset_dir] if cfg.data.dataset_dir else list(cfg.data.sources)


def _made(path: str, made: list[str]) -> bool:
    """Whether ``path`` (a glob too) is a path in ``made``, a folder holding one, or inside one of them."""
    path = posixpath.normpath(path)
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatch(m, path) for m in made)
    return any(path == m or m.startswith(path + "/") or path.startswith(m + "/") for m in made)


def unmade_inputs(commands: list[str], made: list[str] | None = None) -> list[str]:
    """Each path a command reads that no earlier command (nor ``made``) wrote, as 'PATH (in: COMMAND)'. Static: a
    command's reads are its path-like arguments, its writes its output flags, out_dir and a recipe's out_dir."""
    made = [posixpath.normpath(m) for m in made or []]
    unmade = []
    for line in commands:
        words = shlex.split(line)
        unmade += [f"{p} (in: {line})" for p in _read(words) if not _made(p, made)]
        made += [posixpath.normpath(m) for m in _written(words)]
    return unmade


def _tour_outputs() -> list[str]:
    return [posixpath.normpath(m) for line in tour_commands() for m in _written(shlex.split(line))]


def test_every_tour_command_is_one_the_command_line_accepts():
    commands = tour_commands() + sweep_commands()
    assert len(commands) >= 17 and all(c.startswith("lmforge ") for c in commands), commands
    for line in commands:
        argv = shlex.split(line.replace("$'\\n\\n\\n'", "'x'"))[1:]  # ($'..' is bash's, not the parser's)
        if argv[0] == "lm-eval":
            continue  # lm-eval's own command line
        command, _options = parse(argv)
        assert command == argv[0], line
    assert "train(load_train_config(" in python_snippet()


def test_the_tour_reads_only_what_it_wrote_before():
    """No `../shared` (or any file a fresh folder lacks): every path a tour command, the sweep file and the Python
    snippet read is written by an earlier tour command; the sweep file's config loads."""
    readme = README.read_text(encoding="utf-8")
    assert "../shared" not in readme[readme.index("## A short tour"):readme.index("## CLI reference")]
    assert unmade_inputs(tour_commands()) == []
    name, text = sweep_file()
    sweep = yaml.safe_load(text)
    snippet = re.findall(r'load_train_config\("([^"]+)", \[([^]]*)\]', python_snippet())
    assert len(snippet) == 1, "the snippet's one training config"
    reads = [*_data_inputs(trial_config(SweepConfig(base=sweep["base"], overrides=sweep["overrides"]), [])),
             *_data_inputs(load_train_config(snippet[0][0], re.findall(r'"([^"]+)"', snippet[0][1])))]
    assert [p for p in reads if not _made(p, _tour_outputs())] == []
    assert unmade_inputs(sweep_commands(), [*_tour_outputs(), name]) == []


def test_the_static_check_finds_a_file_the_tour_never_wrote():
    """The check above is not vacuous: the tour as it was (tinyshakespeare from ../shared), a recipe's own
    data.sources (relative to the working folder) and a run read before it is trained are all caught."""
    assert unmade_inputs(["lmforge examples tour",
                          "lmforge prepare ../shared/data/tinyshakespeare.txt --out data/chars --tokenizer char",
                          "lmforge train -c shakespeare-char data.sources=tour/shakespeare.txt",
                          "lmforge train -c shakespeare-char out_dir=runs/chars",
                          "lmforge eval runs/mine --lm tour/notes -o eval.json",
                          "lmforge train data.dataset_dir=data/chars out_dir=runs/mine",
                          "lmforge compare runs/mine runs/shakespeare-char --png compare.png"]) == [
        "../shared/data/tinyshakespeare.txt (in: lmforge prepare ../shared/data/tinyshakespeare.txt --out data/chars "
        "--tokenizer char)",
        "tour/shakespeare.txt (in: lmforge train -c shakespeare-char data.sources=tour/shakespeare.txt)",
        "tinyshakespeare.txt (in: lmforge train -c shakespeare-char out_dir=runs/chars)",
        "runs/mine (in: lmforge eval runs/mine --lm tour/notes -o eval.json)"]
    old_sweep = SweepConfig(base="shakespeare-fast", overrides=["train.eval_interval=100"])
    assert _data_inputs(trial_config(old_sweep, [])) == ["tinyshakespeare.txt"]


def test_the_lm_eval_line_comes_after_the_harness_install_it_needs():
    """`lmforge lm-eval` needs the `harness` extra, which the documented install leaves out: the comment right
    above the line says how to install it, and the extra is the package's."""
    lines = _block("## A short tour", "bash").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("lmforge lm-eval"))
    above = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        above.append(line)
    assert any(HARNESS_INSTALL in line for line in above), above
    assert "harness" in (importlib.metadata.metadata("lmforge").get_all("Provides-Extra") or [])


def _fresh_env() -> dict[str, str]:
    """The environment a new user's shell has: this virtualenv's `bin` first on PATH, nothing from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_tour_the_sweep_and_the_python_snippet_run_as_written_outside_the_repository(tmp_path):
    work = tmp_path / "tour"
    work.mkdir()
    assert REPO not in work.parents and not any((p / "shared").exists() for p in work.parents if p != Path("/"))
    env = _fresh_env()
    assert Path(shutil.which("lmforge", path=env["PATH"])).parent == Path(sys.executable).parent
    for line in tour_commands():
        _run(["bash", "-c", toy(line)], work, env)
        if line == "lmforge examples tour":  # what the static check takes it to write
            assert sorted(str(f.relative_to(work / "tour")) for f in (work / "tour").rglob("*") if f.is_file()) == \
                sorted(examples.FILES)
    name, text = sweep_file()
    (work / name).write_text(toy_sweep(text), encoding="utf-8")
    for line in sweep_commands():
        _run(["bash", "-c", line], work, env)
    snippet = python_snippet().replace('"train.max_steps=100"', ", ".join(
        f'"{o}"' for o in ["train.max_steps=2", *TOY_MODEL, *TOY_LOOP, *TOY_SAMPLES]))
    assert snippet != python_snippet(), "the snippet's train.max_steps is the one this test shrinks"
    result = _run([sys.executable, "-c", snippet], work, env)
    assert result.stdout.strip(), "the snippet prints its greedy continuation"
    for made in ("runs/mine/loss.png", "runs/chat/run.json", "eval.json", "compare.png", "predictions.jsonl",
                 "hf_models/mine/config.json", "runs/api/checkpoints/latest", "sweeps/sweep/best.yaml",
                 "sweeps/sweep/trials.json"):
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
