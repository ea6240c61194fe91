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
    for line in ("optim.lr = 0.002", "train.max_minutes = 8", "out_dir = 'runs/default'", "sample.prompt = ''"):
        assert line in out, line  # default.yaml's values, not the defaults in code
