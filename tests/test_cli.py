"""The command line's parsing (lmforge.cli), without running commands: tests/e2e runs them."""

from __future__ import annotations

import pytest

from lmforge.cli import build_parser, parse_intermixed


@pytest.mark.parametrize(("argv", "overrides", "flags"), [
    (["train", "train.max_steps=5", "-c", "shakespeare-fast"], ["train.max_steps=5"], {"config": "shakespeare-fast"}),
    (["finetune", "base=b", "lora.rank=8", "--merge", "train.max_steps=60"], ["base=b", "lora.rank=8",
                                                                               "train.max_steps=60"], {"merge": True}),
    (["train", "a.b=1", "--resume", "r", "c.d=2", "-c", "x", "e.f=3"], ["a.b=1", "c.d=2", "e.f=3"],
     {"resume": "r", "config": "x"})])
def test_overrides_and_flags_mix_in_any_order_and_keep_their_order(argv, overrides, flags):
    args = parse_intermixed(build_parser(), argv)
    assert args.overrides == overrides
    assert {k: getattr(args, k) for k in flags} == flags


def test_an_unknown_flag_among_overrides_is_still_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_intermixed(build_parser(), ["train", "a.b=1", "--bogus", "c.d=2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["lmforge: error: unrecognized arguments: --bogus"]


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
            "    print('exit', e.code)\nmain(['recipes'])\nprint('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert lines[:2] == [f"lmforge {lmforge.__version__}", "exit 0"] and lines[-1] == "torch imported: False"


def test_recipes_lists_each_shipped_recipe_with_its_first_comment_line_and_the_presets_with_sizes(capsys):
    from lmforge.cli import main
    from lmforge.config import RECIPES_DIR
    from lmforge.presets import PRESETS

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next(line for line in path.read_text().splitlines() if line.startswith("#")).lstrip("#").strip()
        assert any(line.split(None, 1) == [path.stem, first] for line in out.splitlines()), path.stem
    rows = {fields[0]: fields[1:] for fields in map(str.split, out.splitlines()) if fields and fields[0] in PRESETS}
    assert rows.keys() == PRESETS.keys()
    assert rows["gpt2-124m"] == ["12", "12", "768", "1024", "85.06M"]  # GPT-2 small: 85M besides its embeddings
    assert rows["gpt2-tiny"][-1] == "0.79M"  # presets.py's "~0.8M"


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--top-p", "1.5", "expected a number in (0, 1], got 1.5"), ("--top-p", "0", "expected a number in (0, 1]"),
    ("--top-p", "nan", "expected a number in (0, 1]"), ("--temperature", "-0.5", "expected a number >= 0"),
    ("-t", "inf", "expected a finite number"), ("--repetition-penalty", "0", "expected a number > 0"),
    ("--repetition-penalty", "-1", "expected a number > 0")])
def test_sampling_values_that_cannot_work_are_one_line_exit_2_at_parse_time(command, flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_intermixed(build_parser(), [command, "RUN", flag, value])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lmforge {command}: error: argument ") and flag in line and expected in line, line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_sampling_values_at_the_edges_of_their_ranges_are_accepted(command):
    args = parse_intermixed(build_parser(), [command, "RUN", "--top-p", "1", "-t", "0", "--repetition-penalty",
                                             "0.5"])
    assert (args.top_p, args.temperature, args.repetition_penalty) == (1.0, 0.0, 0.5)


def test_generate_refuses_a_bad_top_p_before_it_echoes_the_prompt(capsys, tmp_path):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(tmp_path), "--prompt", "ECHO-ME", "--top-p", "1.5"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "ECHO-ME" not in out + err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_every_option_of_generate_and_eval_that_takes_a_value_shows_its_default_in_help(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    inputs = {"lm", "dataset", "generate", "choice", "classify"}  # eval's inputs: each is scored only when given
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in inputs:
            assert "default" in (action.help or ""), action.option_strings
