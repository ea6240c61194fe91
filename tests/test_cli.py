"""The command line's parsing (lmforge.cli), without running commands: tests/e2e runs them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from lmforge.cli import COMMANDS, build_parser, parse
from lmforge.options import GREEDY, OptionError, Sampling, option_docs


def _subparser(command: str):
    return build_parser()._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize(("argv", "overrides", "flags"), [
    (["train", "train.max_steps=5", "-c", "shakespeare-fast"], ["train.max_steps=5"], {"config": "shakespeare-fast"}),
    (["finetune", "base=b", "lora.rank=8", "--merge", "train.max_steps=60"], ["base=b", "lora.rank=8",
                                                                               "train.max_steps=60"], {"merge": True}),
    (["train", "a.b=1", "--resume", "r", "c.d=2", "-c", "x", "e.f=3"], ["a.b=1", "c.d=2", "e.f=3"],
     {"resume": "r", "config": "x"})])
def test_overrides_and_flags_mix_in_any_order_and_keep_their_order(argv, overrides, flags):
    _command, options = parse(argv)
    assert options.overrides == overrides
    assert {k: getattr(options, k) for k in flags} == flags
    assert options.argv == argv  # what --nproc starts again in each process


def test_an_unknown_flag_among_overrides_is_still_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["train", "a.b=1", "--bogus", "c.d=2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["lmforge: error: unrecognized arguments: --bogus"]


@pytest.mark.parametrize(("argv", "suggestion"), [(["train", "--max-steps", "10"], "train.max_steps=10"),
                                                (["train", "a.b=1", "--max-steps=10"], "train.max_steps=10"),
                                                (["train", "--optim-lr", "3e-4"], "optim.lr=3e-4"),
                                                (["finetune", "--lr", "1e-4", "x.y=1"], "optim.lr=1e-4")])
def test_an_unknown_flag_named_like_a_config_key_suggests_the_override(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lmforge: error: unrecognized arguments: --") and f"did you mean {suggestion}?" in line


@pytest.mark.parametrize(("argv", "unknown"), [(["train", "--resum", "runs/x"], "--resum"),
                                             (["finetune", "--mer"], "--mer"),
                                             (["generate", "r", "--temp", "1"], "--temp")])
def test_an_abbreviated_flag_is_an_unknown_flag_not_the_flag_it_begins(argv, unknown, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


def test_a_closed_pipe_on_stdout_or_stderr_neither_raises_nor_fails_the_exit_flush():
    # `lmforge train 2>&1 | tee log`, then Ctrl-C: tee ends first, and the run must still checkpoint and exit 130
    # (tests/training/test_interrupt.py runs that); here, what the command's streams do once their reader is gone.
    import subprocess
    import sys
    import tempfile

    code = ("import os, sys\nfrom lmforge import cli\nr, w = os.pipe()\nos.dup2(w, 1)\nos.dup2(w, 2)\nos.close(r)\n"
            "sys.stdout, sys.stderr = cli._ReaderProof(sys.stdout), cli._ReaderProof(sys.stderr)\n"
            "print('to stdout', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n"
            "print('buffered, flushed at exit')\nsys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__\n"
            "open(sys.argv[1], 'w').write(os.readlink('/proc/self/fd/1') + ' ' + os.readlink('/proc/self/fd/2'))")
    with tempfile.NamedTemporaryFile("r") as f:
        done = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, timeout=60)
        assert done.returncode == 0, done
        assert f.read() == "/dev/null /dev/null"


def test_train_help_shows_the_values_of_the_recipe_that_runs_without_c(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "the recipe 'default'" in out
    for line in ("optim.lr = 0.004", "train.budget_minutes = 3", "out_dir = 'runs/default'", "sample.prompt = ''"):
        assert line in out, line  # default.yaml's values, not the defaults in code


def test_version_and_recipes_answer_without_importing_torch():
    import subprocess
    import sys

    import lmforge

    code = ("import sys\nfrom lmforge.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nmain(['recipes'])\nfrom lmforge.cli import build_parser\nbuild_parser()\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert lines[:2] == [f"lmforge {lmforge.__version__}", "exit 0"] and lines[-1] == "torch imported: False"


def test_recipes_lists_each_shipped_recipe_with_its_whole_first_sentence_and_the_presets_with_sizes(capsys):
    from lmforge.cli import main
    from lmforge.config import RECIPES_DIR, shipped_recipes
    from lmforge.presets import PRESETS

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    recipes = out.split("\n\n", 1)[0]
    words = " ".join(recipes.split())  # the wrapped lines joined again
    descriptions = shipped_recipes()
    assert descriptions.keys() == {path.stem for path in RECIPES_DIR.glob("*.yaml")}
    for name, description in descriptions.items():
        first_line = next(line for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines())
        assert description.startswith(first_line.lstrip("# ")) and description.endswith("."), description
        assert f" {name} {description}" in words, name  # whole, wrapped rather than cut
    # The sentence runs over three lines of the file, and "~1.85" or "train_shakespeare_char.py" do not end it.
    assert descriptions["default"].endswith("the schedule completed), then a few samples.")
    assert descriptions["shakespeare-char"].endswith("batch 12, 2000 iterations.")
    assert max(map(len, recipes.splitlines())) <= 110
    rows = {fields[0]: fields[1:] for fields in map(str.split, out.splitlines()) if fields and fields[0] in PRESETS}
    assert rows.keys() == PRESETS.keys()
    # GPT-2 small: 85M besides its embeddings
    assert rows["gpt2-124m"] == ["12", "12", "768", "1024", "85.06M", "gpt2-style:", "learned,", "layernorm,", "gelu"]
    assert rows["gpt2-tiny"][4] == "0.79M"  # presets.py's "~0.8M"
    assert rows["llama-mini"][5:] == ["llama-style:", "rope,", "rmsnorm,", "swiglu"]


def _leaf_fields(cls: type) -> dict[str, str]:
    """Every field that is a command-line argument (embedded dataclasses' fields included) -> its docstring."""
    hints, docs, out = typing.get_type_hints(cls), option_docs(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("hidden"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            only = f.metadata.get("only")
            out.update({k: v for k, v in _leaf_fields(hints[f.name]).items() if not only or k in only})
        else:
            out[f.name] = docs[f.name]
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_lists_each_option_once_with_its_field_docstring(command, capsys):
    cls = COMMANDS[command][0]
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    actions = [a for a in _subparser(command)._actions if a.dest != "help"]
    fields = _leaf_fields(cls)
    assert sorted(a.dest for a in actions) == sorted(fields)  # one argument per field, no other
    for action in actions:
        assert action.help.replace("%%", "%").startswith(fields[action.dest]), action.dest
    listed = out.split("options:", 1)[1].split("config keys", 1)[0]  # the flags' entries, before any epilog
    entries = [line.split()[0].rstrip(",") for line in listed.splitlines() if line.startswith("  -")]
    assert sorted(entries) == sorted({"-h", *(a.option_strings[0] for a in actions if a.option_strings)}), entries


def test_every_subcommand_has_a_description_and_every_option_a_help_text():
    commands = build_parser()._subparsers._group_actions[0]
    summaries = {action.dest: action.help for action in commands._choices_actions}
    assert summaries.keys() == commands.choices.keys()
    for name, parser in commands.choices.items():
        assert summaries[name] and parser.description, name
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.dest)


@pytest.mark.parametrize("command", ["generate", "export", "chat", "eval", "quantize", "prune"])
def test_the_commands_that_load_a_model_say_a_hugging_face_folder_works(command):
    (run,) = [a for a in _subparser(command)._actions if a.dest == "run"]
    assert "Hugging Face folder" in run.help


def test_device_and_precision_are_declared_once_with_one_default():
    devices = {_subparser(c)._option_string_actions["--device"].default for c in COMMANDS
               if "--device" in _subparser(c)._option_string_actions}
    precisions = {_subparser(c)._option_string_actions["--precision"].default for c in COMMANDS
                  if "--precision" in _subparser(c)._option_string_actions}
    assert devices == {"auto"} and precisions == {"auto"}


@pytest.mark.parametrize("command", ["generate", "eval", "chat"])
@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--top-p", "1.5", "expected a number in (0, 1], got 1.5"), ("--top-p", "0", "expected a number in (0, 1]"),
    ("--top-p", "nan", "expected a number in (0, 1]"), ("--temperature", "-0.5", "expected a number >= 0"),
    ("-t", "inf", "expected a finite number"), ("--repetition-penalty", "0", "expected a number > 0"),
    ("--repetition-penalty", "-1", "expected a number > 0"), ("--top-k", "0", "expected an integer of at least 1"),
    ("-n", "0", "expected an integer of at least 1")])
def test_sampling_values_that_cannot_work_are_one_line_exit_2_at_parse_time(command, flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse([command, "RUN", flag, value])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lmforge {command}: error: argument ") and flag in line and expected in line, line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_sampling_values_at_the_edges_of_their_ranges_are_accepted(command):
    _command, options = parse([command, "RUN", "--top-p", "1", "-t", "0", "--repetition-penalty", "0.5"])
    sampling = options.sampling if command == "generate" else options.request.sampling
    assert sampling == Sampling(temperature=0.0, top_p=1.0, repetition_penalty=0.5)


def test_each_command_gets_its_own_sampling_defaults():
    assert parse(["generate", "RUN"])[1].sampling == Sampling()
    assert parse(["eval", "RUN"])[1].request.sampling == GREEDY  # metrics are reproducible by default


def test_a_sampling_value_that_cannot_work_names_its_field_in_the_python_api():
    with pytest.raises(OptionError, match="top_p: expected a number in") as e:
        Sampling(top_p=2.0)
    assert e.value.name == "top_p"


def test_generate_refuses_a_bad_top_p_before_it_echoes_the_prompt(capsys, tmp_path):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path), "--prompt", "ECHO-ME", "--top-p", "1.5"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "ECHO-ME" not in out + err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_every_option_of_generate_and_eval_that_takes_a_value_shows_its_default_in_help(command):
    inputs = {"lm", "dataset", "generate", "choice", "classify"}  # eval's inputs: each is scored only when given
    for action in _subparser(command)._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in inputs:
            assert "default" in (action.help or ""), action.option_strings


def test_sweep_without_a_sweep_file_or_a_report_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["sweep"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmforge sweep: error: lmforge sweep needs -c SWEEP.yaml (or --report DIR)"


def test_flags_named_apart_from_their_fields_reach_the_fields():
    _command, app = parse(["app", "qa", "src", "--out", "o", "--set", "a=1", "--set", "b=2"])
    assert (app.name, app.sources, app.out_dir, app.overrides) == ("qa", ["src"], "o", ["a=1", "b=2"])
    assert parse(["app", "qa"])[1].overrides == []
    _command, prepare = parse(["prepare", "a.txt", "--out", "d", "--vocab-size", "512"])
    assert (prepare.sources, prepare.out, prepare.data.vocab_size, prepare.data.tokenizer) == (["a.txt"], "d", 512,
                                                                                                "bpe")
