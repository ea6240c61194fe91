"""The ``lmforge`` command: parse arguments into a command's options, call the command's function.

Each command's options are one dataclass, declared next to the code that runs it (:mod:`lmforge.options`
explains how its fields become flags); its command function takes that dataclass. This module only lists
the commands. The functions are named as ``module:function`` and imported when the command runs, so that
``lmforge --help`` or a mistyped flag answers without loading PyTorch (start-up time, not an import cycle):
the options modules import no PyTorch.

A :class:`UserError` becomes one line on stderr and exit status 2; anything else is a bug and keeps its
traceback. The process-wide settings of the command line are made here, never by the Python API: training
processes keep freed memory (:func:`lmforge.runtime.keep_freed_memory`), and a model that torch.compile
cannot compile runs eagerly with a warning (:func:`lmforge.runtime.compile_falls_back_to_eager`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import textwrap
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge import __version__
from lmforge.apps.options import AppRequest
from lmforge.compress.options import ExportOptions, PruneOptions, QuantizeOptions
from lmforge.config import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
    TrainLoopConfig,
    config_help,
    load_finetune_config,
    load_train_config,
    resolve_config_path,
    shipped_recipes,
    to_dict,
)
from lmforge.data.options import PrepareOptions
from lmforge.errors import StorageError, TrainingHalted, TrainingInterrupted, UserError
from lmforge.evaluate.options import CompareOptions, EvalOptions, PredictOptions
from lmforge.examples import ExamplesOptions
from lmforge.options import (
    ChatOptions,
    FinetuneOptions,
    GenerateOptions,
    ImportOptions,
    OptionError,
    SweepOptions,
    TrainingOptions,
    TrainOptions,
    add_options,
    flag_of,
    options_from,
)
from lmforge.presets import PRESETS
from lmforge.rundir import STORAGE_ERRNOS, run_config_path
from lmforge.serve.options import ServeOptions

# --- train and finetune: a config (recipe + dotted overrides), run here in one process or launched in several ---

def _config(o: TrainingOptions, load: Callable[..., Any], default: str | None, **kwargs: Any) -> Any:
    """The config: the run's own to resume (the overrides on top), else the recipe's."""
    if o.resume is None:
        return load(o.config or default, o.overrides)
    try:
        path = run_config_path(o.resume)
    except UserError as e:
        raise UserError(f"cannot resume: {e}") from None
    return load(path, [*o.overrides, f"out_dir={o.resume}"], **kwargs)


def _start(o: TrainingOptions, tc: TrainLoopConfig) -> int | None:
    """``--nproc N``: this command again in N processes under torchrun's agent (its config already checked),
    returning their exit status; else None, with this process set up to train (see the module docstring)."""
    from lmforge.runtime import compile_falls_back_to_eager, keep_freed_memory
    from lmforge.training.parallel import check_nproc, launch, launched, resolve_grad_accum

    if o.nproc is None:
        keep_freed_memory()
        if tc.compile:
            compile_falls_back_to_eager()
        return None
    check_nproc(o.nproc, tc.device)
    resolve_grad_accum(tc.batch_size, tc.grad_accum, tc.global_batch_size, o.nproc)  # before any process starts
    if launched():
        raise UserError("--nproc starts the processes itself; under torchrun, leave it out (torchrun's "
                        "--nproc_per_node says how many)")
    argv, skip = [], False
    for arg in o.argv:  # the same command line without --nproc
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    return launch(o.nproc, argv, tc.device)


def cmd_train(o: TrainOptions) -> int | None:
    from lmforge.training.pretrain import train

    cfg = _config(o, load_train_config, DEFAULT_RECIPE)
    launched = _start(o, cfg.train)
    if launched is not None:
        return launched
    train(cfg, resume=o.resume is not None, allow_data_change=o.allow_data_change)
    return None


def cmd_finetune(o: FinetuneOptions) -> int | None:
    from lmforge.finetuning.finetune import finetune

    o.overrides += ["lora.merge=true"] * o.merge + ["data.skip_bad_lines=true"] * o.skip_bad_lines
    cfg = _config(o, load_finetune_config, None, resume=True)
    launched = _start(o, cfg.train)
    if launched is not None:
        return launched
    finetune(cfg, resume=o.resume is not None)
    return None


@dataclass
class RecipesOptions:
    """List the shipped recipes (train -c NAME) and the model presets, with sizes."""


def cmd_recipes(_o: RecipesOptions) -> None:
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    print(f"recipes (lmforge train -c NAME; the files are in {RECIPES_DIR}):")
    for name, description in recipes.items():
        # Wrapped, never cut: a description is a whole sentence, continued under itself.
        print(textwrap.fill(description, width=110, initial_indent=f"  {name:<{width}}  ",
                            subsequent_indent=" " * (width + 4)))
    width = max(map(len, PRESETS))
    print("\nmodel presets (model.preset=NAME; parameters without the embeddings and output head, whose size comes "
          "from the vocabulary):")
    print(f"  {'preset':<{width}}  n_layer  n_head  n_embd  block_size  parameters  family")
    for name, values in PRESETS.items():
        cfg = ModelConfig(preset=name, **values)
        print(f"  {name:<{width}}  {cfg.n_layer:>7}  {cfg.n_head:>6}  {cfg.n_embd:>6}  {cfg.block_size:>10}  "
              f"{cfg.params_without_embeddings / 1e6:>9.2f}M  {cfg.family}")


COMMANDS: dict[str, tuple[type, Callable | str]] = {
    "prepare": (PrepareOptions, "lmforge.data.prepare:prepare_command"),
    "recipes": (RecipesOptions, cmd_recipes),
    "train": (TrainOptions, cmd_train),
    "examples": (ExamplesOptions, "lmforge.examples:examples_command"),
    "generate": (GenerateOptions, "lmforge.generate_seq2seq:generate_command"),
    "chat": (ChatOptions, "lmforge.chat_repl:chat_command"),
    "eval": (EvalOptions, "lmforge.evaluate.runner:evaluate_command"),
    "compare": (CompareOptions, "lmforge.evaluate.compare:compare_command"),
    "finetune": (FinetuneOptions, cmd_finetune),
    "predict": (PredictOptions, "lmforge.evaluate.predict:predict_command"),
    "serve": (ServeOptions, "lmforge.serve.app:serve"),
    "quantize": (QuantizeOptions, "lmforge.compress.quantize:quantize_command"),
    "prune": (PruneOptions, "lmforge.compress.prune:prune_command"),
    "sweep": (SweepOptions, "lmforge.sweep:sweep_command"),
    "app": (AppRequest, "lmforge.apps.recipe:run_app"),
    "import": (ImportOptions, "lmforge.interop:import_command"),
    "export": (ExportOptions, "lmforge.compress.export:export_run"),
}
"""Each command: its options dataclass (its docstring: the command's help), and its function (``module:name``:
imported when the command runs)."""


def _config_epilog(cls: type, recipe: str | None = None) -> str:
    """The config keys with their docs, and the values of ``recipe`` (what runs without -c) if named."""
    hide = frozenset({"model"}) if cls is FinetuneConfig else frozenset()
    if recipe is None:
        return "config keys (set in YAML or as key=value):\n" + "\n".join(config_help(cls, hide=hide))
    cfg = load_train_config(recipe)
    return (f"config keys (set in YAML or as key=value), with the values that run without -c: the recipe "
            f"'{recipe}' ({resolve_config_path(recipe)}) over the defaults in code; its model is "
            f"{cfg.model.family}. model.preset=NAME sets every architecture key of NAME (`lmforge recipes` lists "
            f"them), the model.* keys after it change single ones:\n"
            + "\n".join(config_help(cls, hide=hide, values=to_dict(cfg))))


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (no usage block), exit status 2, and no abbreviated flags
    (``--resum`` is a mistake, not ``--resume``: a prefix would change meaning when a flag is added). The
    commands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, made from the options dataclasses."""
    parser = _Parser(prog="lmforge", description="Train, evaluate and use GPT-style models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _run) in COMMANDS.items():
        doc = inspect.cleandoc(cls.__doc__ or "")
        summary = " ".join(doc.split("\n\n")[0].split()).rstrip(".")
        epilog = {"train": lambda: _config_epilog(TrainConfig, DEFAULT_RECIPE),
                  "finetune": lambda: _config_epilog(FinetuneConfig)}.get(name)
        p = sub.add_parser(name, help=summary, description=doc, epilog=epilog and epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
        add_options(p, cls)
        p.set_defaults(options=cls)
    lm_eval = ("lm-evaluation-harness's command line with --model lmforge registered "
               "(e.g. lmforge lm-eval run --model lmforge --model_args path=RUN --tasks ...)")
    sub.add_parser("lm-eval", help=lm_eval, description=lm_eval)
    return parser


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[str, Any]:
    """(command, its options) from the command line; a mistake is one line on stderr, exit status 2.

    Dotted overrides and flags mix in any order (``train a=1 -c recipe b=2``): argparse stops filling a
    positional list at the first flag, so the overrides after it are gathered here (argparse's own
    parse_intermixed_args does not support subcommands)."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    if issubclass(args.options, TrainingOptions):
        args.overrides += [a for a in extra if not a.startswith("-") and "=" in a]
        extra = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra:
        config_cls = FinetuneConfig if args.options is FinetuneOptions else TrainConfig
        hint = _override_hint(argv, extra, config_cls) if issubclass(args.options, TrainingOptions) else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    try:
        options = options_from(args, args.options)
    except OptionError as e:
        command_parser.error(f"argument {flag_of(command_parser, e.name)}: {e.problem}")
    except UserError as e:
        command_parser.error(str(e))
    if isinstance(options, TrainingOptions):
        options.argv = argv
    return args.command, options


def _config_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of a config dataclass's leaves (train.max_steps, optim.lr, ...)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _override_hint(argv: list[str], extra: list[str], config_cls: type) -> str:
    """" (did you mean train.max_steps=10?)" for an unknown flag named like a config key (``--max-steps 10``,
    ``--train-max-steps=10``): config keys are set as key=value, not as flags; "" when no flag is."""
    suggestions = []
    for flag in (a for a in extra if a.startswith("--")):
        name, equals, value = flag[2:].partition("=")
        name = name.replace("-", "_")
        keys = [k for k in _config_keys(config_cls) if name in (k.rsplit(".", 1)[-1], k.replace(".", "_"))]
        if not equals:  # the value is the next word, which argparse took for an override
            i = argv.index(flag) + 1
            value = argv[i] if i < len(argv) and not argv[i].startswith("-") and "=" not in argv[i] else "VALUE"
        suggestions += [f"{key}={value}" for key in keys]
    return f" (did you mean {' or '.join(suggestions)}? config keys are set as key=value)" if suggestions else ""


def run_lm_eval(argv: list[str]) -> int:
    """``lmforge lm-eval ARGS``: lm-evaluation-harness's own command line, with the ``lmforge`` model registered."""
    import lmforge._lm_eval_hook  # noqa: F401 - registers --model lmforge once lm-eval's registry loads

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("lmforge lm-eval: error: lm-evaluation-harness is not installed (pip install 'lmforge[harness]')",
              file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"lmforge: warning: {message}\n"


def _function(run: Callable | str) -> Callable:
    if callable(run):
        return run
    module, name = run.split(":")
    return getattr(importlib.import_module(module), name)


class _ReaderProof:
    """sys.stdout or sys.stderr, surviving the end of its reader: ``lmforge train 2>&1 | tee log`` and Ctrl-C, which
    stops tee too. The first write or flush that meets the closed pipe (EPIPE) points the descriptor at /dev/null,
    so the command goes on as it would have without the pipe (a run finishes its step, checkpoints and exits 130),
    and nothing fails when the interpreter flushes the streams at exit."""

    def __init__(self, stream: typing.TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        self._stream.flush()  # what was buffered for the pipe goes nowhere now, instead of failing at exit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """The ``lmforge`` command: its exit status (see the module docstring)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_ReaderProof(s) for s in streams)
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:  # flushed here, a stream meets a closed pipe now if ever, and stays on /dev/null for the flush at exit
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _main(argv: list[str]) -> int:
    warnings.formatwarning = _one_line_warning  # notes such as a skipped damaged checkpoint: one line each
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    command, options = parse(argv)
    # Under torchrun every process meets the same error: rank 0 says it.
    say = print if os.environ.get("RANK", "0") == "0" else lambda *_a, **_k: None
    try:
        result = _function(COMMANDS[command][1])(options)
        return result if isinstance(result, int) else 0
    except UserError as e:
        say(f"lmforge {command}: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        say(f"lmforge {command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingHalted as e:
        say(f"lmforge {command}: halted: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        say(f"lmforge {command}: {e}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        where = f" '{e.filename}'" if e.filename else ""
        print(f"lmforge {command}: error: {e.strerror}{where} (a storage failure: free some space and run the "
              f"command again; a training run resumes with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmforge {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
