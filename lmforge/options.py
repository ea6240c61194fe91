"""Options as types: each command's options are one dataclass, and its command line is made from it.

A command's dataclass lives next to the code that runs it, in a module that does not import PyTorch (so
that ``lmforge --help`` and a mistyped flag answer at once): the package's ``options.py`` (``evaluate``,
``serve``, ``compress``, ``apps``, ``data``), or this module for the top-level commands (generate, chat,
import, sweep, train, finetune). Each field is one option, declared once: its type, its default and its
docstring (the ``--help`` text, as :func:`lmforge.config.field_docs` reads it). :func:`add_options` turns
the fields into argparse arguments and :func:`options_from` turns the parsed arguments back into the
dataclass, whose ``__post_init__`` checks the values and raises :class:`OptionError` naming the field.
Options several commands share are declared once too: a base class the commands inherit
(:class:`DeviceOptions`, :class:`RuntimeOptions`) or a dataclass a command embeds as a field (its fields
become the command's flags, e.g. :class:`Sampling`, which generate, chat, eval and the server share).

How a field becomes an argument: ``bool`` is a ``--flag`` (store_true); ``int``, ``float``, ``str`` and
``X | None`` take a value; ``Literal[...]`` takes one of its values; ``list[X]`` is repeatable (or takes
several values, ``nargs``); :func:`option` adds a short alias, a metavar, a different flag name or makes
the field positional. A field without a default is a required flag (or a required positional).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from lmforge.config import field_docs
from lmforge.errors import UserError


class OptionError(UserError):
    """A value of an option that cannot work: names the field, so that each surface can name it its own way
    (the command line its flag, the server the body's field)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem


def check(ok: bool, name: str, expected: str, value: Any) -> None:
    """OptionError ``name: expected ..., got value`` unless ``ok``."""
    if not ok:
        raise OptionError(name, f"expected {expected}, got {value}")


def check_finite(name: str, value: float) -> None:
    check(math.isfinite(value), name, "a finite number", value)


def option(default: Any = MISSING, *, short: str | None = None, metavar: str | None = None,
           nargs: str | None = None, positional: bool = False, flag: str | None = None,
           only: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A dataclass field with command-line details: ``short`` alias (``-n``), ``metavar``, ``nargs`` of a list
    ('+' or '*'), ``positional``, a ``flag`` name other than the field's (``--out`` for ``out_dir``); for an
    embedded dataclass, ``only`` the fields that become flags; ``cli=False``: no argument at all."""
    meta = {key: value for key, value in (("short", short), ("metavar", metavar), ("nargs", nargs),
                                          ("positional", positional), ("flag", flag), ("only", only),
                                          ("hidden", not cli)) if value}
    if isinstance(default, list) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def option_docs(cls: type) -> dict[str, str]:
    """Every field's docstring, inherited fields' included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    return docs


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _fields(cls: type, only: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("hidden") and (not only or f.name in only)]


def add_options(parser: argparse.ArgumentParser, cls: type, defaults: Any = None, only: tuple[str, ...] = ()) -> None:
    """An argument for every field of the dataclass ``cls`` (``defaults``: an instance whose values are the
    defaults, for an embedded dataclass; ``only``: these fields); the help is the field's docstring and its
    default."""
    hints, docs = typing.get_type_hints(cls), option_docs(cls)
    for f in _fields(cls, only):
        tp, meta, default = hints[f.name], f.metadata, _default(f, defaults)
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, default, meta.get("only", ()))
            continue
        text = docs[f.name]
        if default is not MISSING and default is not None and default is not False and default != []:
            text = f"{text} (default {default})"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if tp is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(tp) is list:
            (kwargs["type"],) = typing.get_args(tp)
            if meta.get("positional"):
                kwargs["nargs"] = meta.get("nargs", "*")
            elif "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            else:
                kwargs["action"] = "append"
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
            kwargs["type"] = type(kwargs["choices"][0])
        else:
            kwargs["type"] = tp
        if "metavar" in meta or "flag" in meta:
            kwargs["metavar"] = meta.get("metavar", meta.get("flag", "").upper())
        if meta.get("positional"):
            parser.add_argument(f.name, **kwargs, **({} if default is MISSING else {"default": default}))
            continue
        names = [f"--{meta.get('flag', f.name).replace('_', '-')}", *([meta["short"]] if "short" in meta else [])]
        if default is MISSING:
            kwargs["required"] = True
        elif kwargs.get("action") != "append":  # an appended list starts empty each time: options_from makes it []
            kwargs["default"] = default
        parser.add_argument(*names, dest=f.name, **kwargs)


def options_from(args: argparse.Namespace, cls: type, only: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` from parsed arguments (a repeatable option never given: an empty list)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in _fields(cls, only):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = options_from(args, hints[f.name], f.metadata.get("only", ()))
        else:
            value = getattr(args, f.name)
            values[f.name] = [] if value is None and typing.get_origin(hints[f.name]) is list else value
    return cls(**values)


def flag_of(parser: argparse.ArgumentParser, name: str) -> str:
    """How the command line spells field ``name`` (``--max-new-tokens/-n``), for its error messages."""
    for action in parser._actions:
        if action.dest == name:
            return "/".join(action.option_strings) or action.dest
    return name


@dataclass(kw_only=True)
class DeviceOptions:
    """Where a command runs its model."""

    device: str = "auto"
    """'auto' (a GPU where there is one, else the CPU; quantize and prune: the CPU, where the integer kernels
    run), 'cpu', 'cuda', 'cuda:1', 'mps'."""


@dataclass(kw_only=True)
class RuntimeOptions(DeviceOptions):
    """Where and at which precision a command runs its model."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 where the hardware is fast at it, fp16 on older GPUs, else fp32."""


# --- the sampling settings: generate, chat, eval --generate and serve ----------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: repetition penalty, then temperature (0: greedy), top-k and top-p; seeded.

    When a generation stops (max_new_tokens, stop strings) is not part of it: that belongs to each request, and
    the commands differ there (generate writes 200 tokens, eval 64, the server what the context leaves). The
    end-of-training samples (the config's ``sample`` section, :class:`lmforge.config.SampleConfig`) are a
    training setting (how many, of which prompt, a temperature and a top-k) that the trainer turns into one.
    """

    temperature: float = option(0.8, short="-t")
    """Sampling temperature, 0 means greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens (default: all)."""
    top_p: float | None = None
    """Sample among the most likely tokens whose probabilities add up to p, in (0, 1] (default: all)."""
    repetition_penalty: float = 1.0
    """Make tokens already in the text less likely (> 1) or more (< 1); 1 is none."""
    seed: int | None = 0
    """Sampling seed: the same seed, prompt and settings give the same text (None, in the Python API and the
    server: a fresh seed each time)."""

    def __post_init__(self) -> None:
        check_finite("temperature", self.temperature)
        check(self.temperature >= 0, "temperature", "a number >= 0 (0 means greedy)", self.temperature)
        check(self.top_k is None or self.top_k >= 1, "top_k", "an integer of at least 1", self.top_k)
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        check_finite("repetition_penalty", self.repetition_penalty)
        check(self.repetition_penalty > 0, "repetition_penalty", "a number > 0 (1 means none)",
              self.repetition_penalty)


GREEDY = Sampling(temperature=0.0)
"""Always the most likely token."""


@dataclass(frozen=True)
class Search:
    """Beam search (encoder-decoder runs): keep the ``beams`` likeliest partial outputs at each step, return the best
    finished one.

    Apart from :class:`Sampling` because it chooses whole outputs, not each next token: deterministic, so it takes
    temperature 0 (:meth:`check_sampling`). Embedded like Sampling by each command that writes with an encoder-decoder
    (generate, eval --generate; a server would check its request's fields by building one).
    """

    beams: int = 1
    """Beam search over N hypotheses (encoder-decoder runs, with -t 0); 1: none, each token drawn as the sampling
    options say."""
    length_penalty: float = 1.0
    """Beam search: a finished output scores its summed log-probabilities / its length ** this (transformers'
    rule): above 0 favours longer outputs, below 0 shorter ones."""

    def __post_init__(self) -> None:
        check(self.beams >= 1, "beams", "an integer of at least 1", self.beams)
        check_finite("length_penalty", self.length_penalty)

    def check_sampling(self, sampling: Sampling) -> None:
        """OptionError naming ``beams`` when beam search is asked together with sampling (temperature above 0)."""
        if self.beams > 1 and sampling.temperature > 0:
            raise OptionError("beams", f"beam search keeps the likeliest outputs, it does not sample: with "
                                       f"{self.beams} beams give temperature 0 (-t 0)")


BEAMLESS = Search()
"""No beam search: each token drawn as the sampling says."""


# --- the options of the top-level commands whose modules import PyTorch ---------------------------------------

@dataclass(kw_only=True)
class GenerationOptions(RuntimeOptions):
    """What ``generate`` and ``chat`` share: how many tokens, how they are drawn, where the model runs."""

    max_new_tokens: int = option(200, short="-n")
    """Tokens to generate per prompt (chat: per reply)."""
    sampling: Sampling = field(default_factory=Sampling)
    compile: bool = False
    """torch.compile the model first: on a CPU one-at-a-time decoding then runs 2-5x faster, after a one-off
    compile (5-60 s by model size; cached on disk for the next run); worth it for long or many generations."""

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", "an integer of at least 1", self.max_new_tokens)


@dataclass
class GenerateOptions(GenerationOptions):
    """Sample text from a trained model, or write the target of each source with an encoder-decoder."""

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    prompt: list[str] = option([], short="-p")
    """Prompt text, an encoder-decoder run's source (repeat for a batch; default: none, one empty prompt starts a new
    document)."""
    prompt_file: str | None = None
    """File with one prompt (or source) per line, after the --prompt ones (default: none)."""
    stop: list[str] = option([])
    """Stop where the text contains this string, taken literally (a newline in bash: $'\\n'); repeatable
    (default: none)."""
    chat: bool = False
    """Wrap each prompt as a user turn of the run's chat template."""
    lookup: int | None = option(None, metavar="N")
    """Speculative decoding by prompt lookup: propose what followed the last earlier occurrence of the text's last
    N tokens (N down to 1), all checked in one step; the same text as plain greedy decoding, faster where the
    text repeats itself (code, quotes). Greedy (-t 0) only: sampling decodes plainly (default: off)."""
    draft: str | None = option(None, metavar="RUN")
    """Speculative decoding with this small run as the draft model (the same tokenizer): it proposes, the model
    checks several tokens in one step; the same text as plain greedy decoding. Greedy (-t 0) only: sampling
    decodes plainly (default: off)."""
    draft_tokens: int = 4
    """Tokens --lookup or --draft proposes per step."""
    search: Search = option(Search())

    def __post_init__(self) -> None:
        super().__post_init__()
        self.search.check_sampling(self.sampling)
        check(self.lookup is None or self.lookup >= 1, "lookup", "an n-gram size of at least 1", self.lookup)
        check(self.draft_tokens >= 1, "draft_tokens", "an integer of at least 1", self.draft_tokens)
        if self.lookup is not None and self.draft is not None:
            raise OptionError("lookup", "give --lookup or --draft, not both")


@dataclass
class ChatOptions(GenerationOptions):
    """Talk with a model: a multi-turn conversation in its chat template.

    An interactive conversation in the run's chat template, each reply streamed; the oldest turns give way when
    the conversation outgrows the context. /reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops a reply.
    """

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""


@dataclass
class ImportOptions:
    """Turn a Hugging Face model folder (or hub id) into a run directory."""

    source: str = option(positional=True)
    """Folder in save_pretrained format (GPT-2, Llama, Mistral, Qwen2), or a hub id."""
    out: str
    """Run directory to create."""


@dataclass
class SweepOptions:
    """Hyper-parameter search on Optuna: each trial an ordinary run, pruned early.

    Run (or continue) the Optuna study a sweep file describes: TPE sampling, MedianPruner, SQLite storage with
    heartbeats in the sweep directory (a killed sweep resumes its running trial), then a table, best.yaml and PNGs.
    """

    config: str | None = option(None, short="-c")
    """Sweep YAML: base, overrides, space, metric, direction, trials, pruner."""
    trials: int | None = None
    """Finished trials to reach (default: the file's)."""
    timeout: float | None = option(None, metavar="MIN")
    """Start no trial after this many minutes (default: no limit)."""
    study: str | None = None
    """Study name (default: the sweep file's name)."""
    storage: str | None = None
    """Optuna storage URL (default: sqlite in the sweep directory; journal:PATH for a journal file several
    processes share)."""
    out: str | None = None
    """Sweep directory (default: sweeps/STUDY)."""
    report: str | None = option(None, metavar="DIR")
    """Print and write the report of the sweep in DIR, then exit (default: run the sweep)."""

    def __post_init__(self) -> None:
        check(self.trials is None or self.trials >= 1, "trials", "an integer of at least 1", self.trials)
        check(self.timeout is None or (math.isfinite(self.timeout) and self.timeout > 0), "timeout",
              "a number > 0", self.timeout)
        if not (self.config or self.report):
            raise UserError("lmforge sweep needs -c SWEEP.yaml (or --report DIR)")


@dataclass(kw_only=True)
class TrainingOptions:
    """What ``lmforge train`` and ``lmforge finetune`` share: the config, and how many processes run it."""

    config: str | None = option(None, short="-c")
    """YAML recipe, or a shipped recipe's name (lmforge recipes lists them)."""
    resume: str | None = option(None, metavar="RUN_DIR")
    """Continue an interrupted run exactly (its own config, and these overrides on top)."""
    nproc: int | None = option(None, metavar="N")
    """Train in N processes on this machine (torchrun's agent, started for you: gloo on CPUs, NCCL on GPUs);
    parallel.strategy=ddp|fsdp says how (default: one process)."""
    overrides: list[str] = option([], positional=True)
    """Dotted config overrides, key=value, before or after the flags (e.g. train.max_steps=500); the keys are
    listed below."""
    argv: list[str] = option([], cli=False)
    """The command line, for --nproc to start the same command in each process."""

    def __post_init__(self) -> None:
        check(self.nproc is None or self.nproc >= 1, "nproc", "an integer of at least 1", self.nproc)


@dataclass
class TrainOptions(TrainingOptions):
    """Pretrain a model (no arguments: the default corpus and recipe)."""

    allow_data_change: bool = False
    """With --resume: continue even if the dataset was prepared again with other content."""


@dataclass
class FinetuneOptions(TrainingOptions):
    """Adapt a trained model: chat SFT or classification, full or LoRA."""

    merge: bool = False
    """LoRA: also write full weights with the adapters merged (lora.merge=true)."""
    skip_bad_lines: bool = False
    """Skip (and count) records that are not valid or lack a field, instead of stopping (data.skip_bad_lines=true)."""
