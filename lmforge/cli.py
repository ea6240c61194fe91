"""The ``lmforge`` command: parse arguments, call one function per subcommand.

A :class:`UserError` becomes one line on stderr and exit status 2; anything else is a bug and
keeps its traceback. Each subcommand imports what it runs inside its function, so that ``lmforge
--help`` or a mistyped flag answers without loading PyTorch (start-up time, not an import cycle).

The process-wide settings of the command line are made here, never by the Python API: training
processes keep freed memory (:func:`lmforge.runtime.keep_freed_memory`), and a model that
torch.compile cannot compile runs eagerly with a warning (:func:`lmforge.runtime.compile_falls_back_to_eager`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
import warnings
from pathlib import Path

from lmforge import __version__
from lmforge.config import (
    RECIPES_DIR,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
    TrainLoopConfig,
    config_help,
    field_default,
    field_docs,
    load_finetune_config,
    load_train_config,
    resolve_config_path,
    shipped_recipes,
    to_dict,
)
from lmforge.errors import StorageError, TrainingHalted, TrainingInterrupted, UserError
from lmforge.presets import PRESETS
from lmforge.rundir import STORAGE_ERRNOS, run_config_path

DEFAULT_RECIPE = "default"
"""The recipe `lmforge train` runs without -c (`train --help` shows its values)."""
PREPARE_FIELDS = ("tokenizer", "vocab_size", "val_fraction", "seed", "text_field", "workers")
"""DataConfig fields that ``lmforge prepare`` takes as flags (--vocab-size, ...); sources are positional."""


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import format_summary, prepare

    cfg = DataConfig(sources=args.sources, **{name: getattr(args, name) for name in PREPARE_FIELDS})
    meta = prepare(cfg, args.out, progress=True, overwrite=args.overwrite)
    print(format_summary(meta))


def cmd_recipes(args: argparse.Namespace) -> None:
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    print(f"recipes (lmforge train -c NAME; the files are in {RECIPES_DIR}):")
    for name, description in recipes.items():
        print(f"  {name:<{width}}  {description}")
    width = max(map(len, PRESETS))
    print("\nmodel presets (model.preset=NAME; parameters without the embeddings and output head, whose size comes "
          "from the vocabulary):")
    print(f"  {'preset':<{width}}  n_layer  n_head  n_embd  block_size  parameters")
    for name, values in PRESETS.items():
        cfg = ModelConfig(preset=name, **values)
        print(f"  {name:<{width}}  {cfg.n_layer:>7}  {cfg.n_head:>6}  {cfg.n_embd:>6}  {cfg.block_size:>10}  "
              f"{cfg.params_without_embeddings / 1e6:>9.2f}M")


def _resume_config(run: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """The run's own config file and the overrides to apply to it (e.g. a larger train.max_steps)."""
    try:
        path = run_config_path(run)
    except UserError as e:
        raise UserError(f"cannot resume: {e}") from None
    return path, [*overrides, f"out_dir={run}"]


def _training_process(compile_model: bool) -> None:
    """The command line's process-wide settings for a training process (see the module docstring)."""
    from lmforge.runtime import compile_falls_back_to_eager, keep_freed_memory

    keep_freed_memory()
    if compile_model:
        compile_falls_back_to_eager()


def _launch(args: argparse.Namespace, tc: TrainLoopConfig) -> int:
    """``--nproc N``: this command again in N processes under torchrun's agent (its config already checked)."""
    from lmforge.training.parallel import check_nproc, launch, launched, resolve_grad_accum

    check_nproc(args.nproc, tc.device)
    resolve_grad_accum(tc.batch_size, tc.grad_accum, tc.global_batch_size, args.nproc)  # before any process starts
    if launched():
        raise UserError("--nproc starts the processes itself; under torchrun, leave it out (torchrun's "
                        "--nproc_per_node says how many)")
    argv, skip = [], False
    for arg in args.argv:  # the same command line without --nproc
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    return launch(args.nproc, argv, tc.device)


def cmd_train(args: argparse.Namespace) -> int | None:
    from lmforge.training.loop import train

    overrides = list(args.overrides)
    resume = args.resume is not None
    cfg = load_train_config(*_resume_config(args.resume, overrides)) if resume \
        else load_train_config(args.config or DEFAULT_RECIPE, overrides)
    if args.nproc is not None:
        return _launch(args, cfg.train)
    _training_process(cfg.train.compile)
    train(cfg, resume=resume, allow_data_change=args.allow_data_change)


def cmd_examples(args: argparse.Namespace) -> None:
    from lmforge.examples import write_examples

    files = write_examples(args.out)
    names = ", ".join(str(f.relative_to(args.out)) for f in files)
    print(f"wrote {len(files)} example files into {args.out}: {names}")


def cmd_finetune(args: argparse.Namespace) -> int | None:
    from lmforge.finetuning.loop import finetune

    overrides = list(args.overrides) + (["lora.merge=true"] if args.merge else []) \
        + (["data.skip_bad_lines=true"] if args.skip_bad_lines else [])
    resume = args.resume is not None
    cfg = load_finetune_config(*_resume_config(args.resume, overrides), resume=True) if resume \
        else load_finetune_config(args.config, overrides)
    if args.nproc is not None:
        return _launch(args, cfg.train)
    _training_process(cfg.train.compile)
    finetune(cfg, resume=resume)


def cmd_predict(args: argparse.Namespace) -> None:
    from lmforge.evaluate.predict import predict_cli

    predict_cli(args.run, texts=args.text or [], file=args.file, text_field=args.text_field,
                label_field=args.label_field, output=args.output, device=args.device)


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.evaluate.runner import EvalRequest, evaluate_run, format_report, report_path, write_report

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    req = EvalRequest(lm=args.lm or [], dataset=args.dataset, split=args.split, generate=args.generate,
                      choice=args.choice, classify=args.classify, stride=args.stride, batch_size=args.batch_size,
                      text_field=args.text_field, label_field=args.label_field, sampling=sampling,
                      max_new_tokens=args.max_new_tokens, stop=args.stop or [], chat=args.chat)
    out = report_path(args.output, args.run)
    report = evaluate_run(args.run, req, args.device, args.precision)
    print(format_report(report))
    print(f"\nwrote {write_report(report, out)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from lmforge.evaluate.compare import compare_runs, format_comparison

    rows, png = compare_runs(args.runs, args.png, bpb=args.bpb)
    print(format_comparison(rows))
    print(f"\nloss curves: {png}")


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.data.records import read_text_file
    from lmforge.generate import generate_text
    from lmforge.run import load_run
    from lmforge.runtime import compile_falls_back_to_eager, maybe_compile, setup_runtime

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line for line in read_text_file(args.prompt_file, "--prompt-file").splitlines() if line.strip()]
    if not prompts:
        prompts = [""]
    rt = setup_runtime(args.device, args.precision)
    run = load_run(args.run, rt.device)
    if run.task != "lm":
        raise UserError(f"'{args.run}' is a {run.task} run: it labels texts (lmforge predict), it does not generate")
    if args.compile:
        compile_falls_back_to_eager()
    model = maybe_compile(run.model, args.compile, dynamic=True)
    # What stdout shows before each continuation: a plain prompt (the continuation carries it on); with
    # --chat, not the rendered template: nothing before a streamed answer, the user's text in a batch.
    shown = [p + "\n" for p in prompts] if args.chat else list(prompts)
    stop_ids: list[int] = []
    if args.chat:
        prompts, stop_ids = chat_prompts(args.run, run, prompts)
    if len(prompts) == 1 and not args.chat:  # the continuation streams right after its prompt
        print(prompts[0], end="", flush=True)
    with rt.autocast():
        texts = generate_text(
            model, run.tokenizer, prompts, args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop_strings=args.stop or (), stream=sys.stdout if len(prompts) == 1 else None, allow_special=args.chat,
            stop_ids=stop_ids,
        )
    if len(prompts) == 1:
        print()
        return
    for prompt, text in zip(shown, texts, strict=True):
        print(f"{prompt}{text}\n----")


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat_repl import chat_cli

    chat_cli(args.run, max_new_tokens=args.max_new_tokens, device=args.device, precision=args.precision,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             repetition_penalty=args.repetition_penalty, seed=args.seed)


def chat_prompts(path: str, run, prompts: list[str]) -> tuple[list[str], list[int]]:
    """Each prompt as a user turn in the run's chat template, ending where the answer starts."""
    from lmforge.chat_repl import run_template

    template = run_template(path, run)
    return [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts], \
        template.stop_ids


def cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve.app import serve

    serve(args.run, host=args.host, port=args.port, api_key=args.api_key, device=args.device,
          precision=args.precision, max_batch=args.max_batch, max_queue=args.max_queue, compile_model=args.compile,
          name=args.model_name, static=args.batching == "static")


def cmd_import(args: argparse.Namespace) -> None:
    from lmforge.interop import import_hf

    out = import_hf(args.source, args.out)
    print(f"imported '{args.source}' into {out} (use it wherever a run directory is accepted)")


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.chat import find_chat_template
    from lmforge.interop import export_hf
    from lmforge.model.quantized import dequantized, is_quantized
    from lmforge.run import load_run

    run = load_run(args.run)
    if run.task != "lm":
        raise UserError(f"'{args.run}' is a {run.task} run; only language models export")
    model, note = run.model, ""
    if is_quantized(model):  # neither format holds our integer layout: the weights go out as floats
        model, note = dequantized(model), " (its quantized weights dequantized to float)"
    template = find_chat_template(run.folder)
    if args.format == "gguf":
        from lmforge.compress.gguf import export_gguf
        from lmforge.compress.report import format_report, gguf_report

        out = export_gguf(model, run.tokenizer, args.out, args.type, name=run.folder.name,
                          chat_template=template[0] if template else None, turn_end=template[1] if template else None)
        report = gguf_report(run, model, out, args.type)
        print(format_report(report))
        where = report.write_to(out.with_name(out.name + ".report.json"))
        print(f"\nexported {run.checkpoint}{note} to {out} ({args.type}; llama.cpp: llama-cli -m {out}); "
              f"report {where}")
        return
    out = export_hf(model, run.tokenizer, args.out, chat_template=template)
    print(f"exported {run.checkpoint}{note} to {out} (transformers: AutoModelForCausalLM.from_pretrained('{out}'))")


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.compress.quantize import quantize_run
    from lmforge.model.quantized import QuantSpec

    spec = QuantSpec(args.method, args.group_size, args.include_embeddings)
    report = quantize_run(args.run, args.out, spec, data=args.data, windows=args.windows, speed=not args.no_speed,
                          device=args.device)
    print(f"\nwrote {report.out} (use it wherever a run directory is accepted)")


def cmd_prune(args: argparse.Namespace) -> None:
    from lmforge.compress.prune import PruneSpec, prune_run

    spec = PruneSpec(args.method, args.sparsity, args.ratio)
    report = prune_run(args.run, args.out, spec, calibration=args.calibration,
                       calibration_windows=args.calibration_windows, data=args.data, windows=args.windows,
                       recover_steps=args.recover_steps, speed=not args.no_speed, device=args.device)
    print(f"\nwrote {report.out} (use it wherever a run directory is accepted)")


def cmd_sweep(args: argparse.Namespace) -> None:
    from lmforge.sweep import report_cli, run_sweep

    if args.report:
        report_cli(args.report, study=args.study, storage=args.storage)
        return
    if not args.config:
        raise UserError("lmforge sweep needs -c SWEEP.yaml (or --report DIR)")
    run_sweep(args.config, trials=args.trials, timeout_min=args.timeout, study=args.study, storage=args.storage,
              out_dir=args.out)


def cmd_app(args: argparse.Namespace) -> None:
    from lmforge.apps.recipe import AppRequest, get_app, run_app

    app = get_app(args.name)
    options = {"lang": args.lang} if "lang" in app.options else {}
    if args.lang != "de" and "lang" not in app.options:
        raise UserError(f"--lang applies to translation, not to {app.name}")
    run_app(AppRequest(name=args.name, sources=args.sources, out_dir=args.out, base=args.base, seed=args.seed,
                       split_seed=args.split_seed, test_fraction=args.test_fraction, max_test=args.max_test,
                       overrides=args.set or [], data_only=args.data_only, options=options))


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", metavar="SRC",
                   help="text files/folders to measure perplexity on (default: the run's val split)")
    p.add_argument("--windows", type=positive_int, default=64,
                   help="context-length windows the perplexity is measured on (default %(default)s)")
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1' (default %(default)s)")


def _config_epilog(cls: type, hide: frozenset[str] = frozenset(), recipe: str | None = None) -> str:
    """The config keys with their docs, and the values of ``recipe`` (what runs without -c) if named."""
    if recipe is None:
        return "config keys (set in YAML or as key=value):\n" + "\n".join(config_help(cls, hide=hide))
    values = to_dict(load_train_config(recipe))
    return (f"config keys (set in YAML or as key=value), with the values that run without -c: the recipe "
            f"'{recipe}' ({resolve_config_path(recipe)}) over the defaults in code:\n"
            + "\n".join(config_help(cls, hide=hide, values=values)))


def _add_config_flags(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...]) -> None:
    """A --flag for each named field of a config dataclass: its type, default and docstring as help."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    for name in names:
        default = field_default(fields[name])
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=hints[name], default=default,
                       help=f"{docs[name]} (default {default})")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_nproc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train in N processes on this machine (torchrun's agent, started for you: gloo on CPUs, "
                        "NCCL on GPUs); parallel.strategy=ddp|fsdp says how")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (no nan, no inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (a temperature: 0 is greedy)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 means greedy), got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a repetition penalty: 1 is none)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (1 means none), got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1] (top-p: 1 keeps every token)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``generate`` and ``chat`` share: how many tokens, how to sample them, where to run."""
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=200,
                   help="tokens to generate per prompt (chat: per reply) (default %(default)s)")
    p.add_argument("--temperature", "-t", type=non_negative_float, default=0.8,
                   help="sampling temperature, 0 means greedy (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample among the most likely tokens whose probabilities add up to p, in (0, 1] (default: all)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="make tokens already in the text less likely (> 1) or more (< 1); 1 is none "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', 'mps' (default %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 where the hardware is fast at it, fp16 on older GPUs, else fp32 "
                        "(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Train, evaluate and use GPT-style models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn text files into tokenized train/val shards",
                       description="Read text/markdown/code/JSONL/Parquet files, folders or globs; drop "
                                   "duplicates; split train/val; train a tokenizer; write train.bin/val.bin.")
    p.add_argument("sources", nargs="*", help="files, folders or globs (none: the Python standard library)")
    p.add_argument("--out", required=True, help="output folder")
    _add_config_flags(p, DataConfig, PREPARE_FIELDS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset in --out")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("recipes", help="list the shipped recipes (train -c NAME) and the model presets, with sizes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="pretrain a model (no arguments: the default corpus and recipe)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_epilog(TrainConfig, recipe=DEFAULT_RECIPE))
    p.add_argument("--config", "-c", help="YAML recipe, or a shipped recipe's name (e.g. shakespeare-char)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue even if the dataset was prepared again with other content")
    _add_nproc_flag(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=500 model.n_layer=6")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("examples", help="write the README tour's small example inputs (from the standard library)")
    p.add_argument("out", help="folder to create")
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--prompt", "-p", action="append",
                   help="prompt text (repeat for a batch; default: none, one empty prompt starts a new document)")
    p.add_argument("--prompt-file", help="file with one prompt per line, after the --prompt ones (default: none)")
    p.add_argument("--stop", action="append",
                   help="stop where the text contains this string, taken literally (a newline in bash: $'\\n'); "
                        "repeatable (default: none)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the run's chat template")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first: decoding gets faster after a one-off compile (20-30 s on a "
                        "small CPU); worth it for long or many generations")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a model: a multi-turn conversation in its chat template",
                       description="An interactive conversation in the run's chat template, each reply streamed; "
                                   "the oldest turns give way when the conversation outgrows the context. "
                                   "/reset, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops a reply.")
    p.add_argument("run", help="run directory, checkpoint directory or Hugging Face folder")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="measure a model: perplexity/bits per byte, generation and choice tasks",
                       description="Evaluate a run, checkpoint or Hugging Face folder; prints a table and writes JSON.")
    p.add_argument("run", help="run directory, checkpoint directory or Hugging Face folder")
    p.add_argument("--lm", nargs="+", metavar="SRC", help="text files/folders/globs (.jsonl/.parquet: a text "
                                                         "field): loss, perplexity, bits per byte")
    p.add_argument("--stride", type=positive_int,
                   help="sliding-window stride in tokens (default: the context: disjoint)")
    p.add_argument("--dataset", metavar="DIR", help="a prepared dataset: its split, windowed as training evaluates")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="the --dataset split to score (default %(default)s)")
    p.add_argument("--generate", metavar="FILE", help="JSONL of prompt + reference(s): BLEU, chrF, ROUGE, exact match")
    p.add_argument("--choice", metavar="FILE", help="JSONL of context + choices + label: multiple-choice accuracy")
    p.add_argument("--classify", metavar="FILE", help="CSV/JSONL of text + label (classification runs)")
    p.add_argument("--text-field", default="text",
                   help="the text's field in --lm .jsonl/.parquet and --classify files (default %(default)s)")
    p.add_argument("--label-field", default="label", help="the label's field in --classify files (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default %(default)s)")
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=64,
                   help="--generate: tokens per answer at most (default %(default)s)")
    p.add_argument("--temperature", "-t", type=non_negative_float, default=0.0,
                   help="--generate: sampling temperature, 0 means greedy (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="--generate: sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="--generate: sample among the most likely tokens whose probabilities add up to p, in (0, 1] "
                        "(default: all)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="--generate: make tokens already in the text less likely (> 1); 1 is none "
                        "(default %(default)s)")
    p.add_argument("--stop", action="append",
                   help="--generate: stop where the answer contains this string, taken literally; repeatable "
                        "(default: none)")
    p.add_argument("--seed", type=int, default=0, help="--generate: sampling seed (default %(default)s)")
    p.add_argument("--chat", action="store_true",
                   help="--generate: wrap each prompt as a user turn of the run's chat template (fine-tuned runs)")
    p.add_argument("--output", "-o", help="JSON report path (default: RUN/eval.json, or ./eval.json)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', 'mps' (default %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 where the hardware is fast at it, fp16 on older GPUs, else fp32 "
                        "(default %(default)s)")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line with --model lmforge registered "
                                   "(e.g. lmforge lm-eval run --model lmforge --model_args path=RUN --tasks ...)")

    p = sub.add_parser("compare", help="final metrics of several runs side by side, and one PNG of their loss curves")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--png", default="compare.png", help="where to write the loss curves (default compare.png)")
    p.add_argument("--bpb", action="store_true",
                   help="plot bits per byte instead of loss per token: runs with different tokenizers on one axis")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("finetune", help="adapt a trained model: chat SFT or classification, full or LoRA",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_epilog(FinetuneConfig, hide=frozenset({"model"})))
    p.add_argument("--config", "-c", help="YAML recipe")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted fine-tuning run exactly")
    p.add_argument("--merge", action="store_true", help="LoRA: also write full weights with the adapters merged")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) records that are not valid or lack a field, instead of stopping")
    _add_nproc_flag(p)
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. base=runs/lmforge data.train=chat.jsonl task=sft lora.rank=8")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="label texts with a classification run")
    p.add_argument("run", help="classification run directory or checkpoint")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--file", help=".txt (one text per line), .jsonl or .csv file of texts")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label", help="if the file has labels, accuracy is reported")
    p.add_argument("--output", help="write predictions as JSONL here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (completions, chat, streaming) and a chat page")
    p.add_argument("run", help="run directory, checkpoint directory or Hugging Face folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="requests decoded together in one batch (default %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a free row before the server answers 429 (default %(default)s)")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: requests join and leave the running batch between steps; static (to compare): "
                        "waiting requests start only when the whole batch has finished (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--model-name", help="the model's name in the API (default: the run directory's name)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', 'mps' (default %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision (default %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="store a run's Linear weights as int8 or int4, with a report of the cost",
                       description="Weight-only quantization of every Linear of the blocks (int8: per output "
                                   "channel; int4: scale and zero per group of inputs) into a new run directory that "
                                   "generate, eval, serve and export load; prints and writes bytes, perplexity and "
                                   "decode speed before and after.")
    p.add_argument("run", help="run directory, checkpoint directory or Hugging Face folder")
    p.add_argument("--method", required=True, choices=["int8", "int4"], help="integer width")
    p.add_argument("--group-size", type=positive_int, default=32,
                   help="int4: inputs per scale/zero group, 32/64/128/256 (default %(default)s)")
    p.add_argument("--include-embeddings", action="store_true",
                   help="quantize the token embedding and output head too (default: kept in bf16)")
    p.add_argument("--out", required=True, help="run directory to create")
    _add_report_flags(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("prune", help="zero or remove weights of a run (magnitude, Wanda, MLP neurons), then recover",
                       description="Unstructured pruning by |W| (magnitude) or |W|*||X|| per output row (Wanda), or "
                                   "structured removal of MLP neurons (a smaller model), into a new run directory; "
                                   "--recover-steps N trains it N steps with the sparsity held fixed (resumable with "
                                   "lmforge train --resume OUT). Prints and writes a report.")
    p.add_argument("run", help="run directory, checkpoint directory or Hugging Face folder")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "structured"], help="what to remove")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="magnitude/wanda: fraction of each layer's weights set to zero (default %(default)s)")
    p.add_argument("--ratio", type=float, default=0.25,
                   help="structured: fraction of each block's MLP neurons removed (default %(default)s)")
    p.add_argument("--calibration", nargs="+", metavar="SRC",
                   help="wanda/structured: text files to calibrate on (default: the run's train split)")
    p.add_argument("--calibration-windows", type=positive_int, default=128,
                   help="calibration windows of the model's context (default %(default)s)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="train the pruned model this many steps on the source's dataset (default: none)")
    p.add_argument("--out", required=True, help="run directory to create")
    _add_report_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="hyper-parameter search on Optuna: each trial an ordinary run, pruned early",
                       description="Run (or continue) the Optuna study a sweep file describes: TPE sampling, "
                                   "MedianPruner, SQLite storage with heartbeats in the sweep directory (a killed "
                                   "sweep resumes its running trial), then a table, best.yaml and PNGs.")
    p.add_argument("--config", "-c", help="sweep YAML: base, overrides, space, metric, direction, trials, pruner")
    p.add_argument("--trials", type=positive_int, help="finished trials to reach (default: the file's)")
    p.add_argument("--timeout", type=positive_float, metavar="MIN", help="start no trial after this many minutes")
    p.add_argument("--study", help="study name (default: the sweep file's name)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in the sweep directory; journal:PATH for "
                                     "a journal file several processes share)")
    p.add_argument("--out", help="sweep directory (default: sweeps/STUDY)")
    p.add_argument("--report", metavar="DIR", help="print and write the report of the sweep in DIR, then exit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("app", help="an application end to end: translation, summarization or qa from local text",
                       description="Build the task's records from this machine's text (or SOURCES), split them, "
                                   "fine-tune the default run on them (chat SFT), evaluate on the held-out split "
                                   "beside the simple baselines, and write OUT/report.md and results.json.")
    p.add_argument("name", choices=["translation", "summarization", "qa"], help="the application")
    p.add_argument("sources", nargs="*", help="translation: .po/.mo files or folders (default: the system's "
                                              "catalogs for --lang); summarization, qa: .py files or folders "
                                              "(default: the standard library)")
    p.add_argument("--lang", default="de", help="translation: the language to translate English into "
                                                "(default %(default)s)")
    p.add_argument("--out", help="output folder (default runs/apps/NAME-seedN)")
    p.add_argument("--base", default="runs/default",
                   help="the run to fine-tune (default %(default)s, trained first if missing)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (default %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split (default %(default)s)")
    p.add_argument("--test-fraction", type=probability, help="held-out fraction of the records (default: the app's)")
    p.add_argument("--max-test", type=positive_int, help="evaluate on the first N test records only")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a fine-tuning override on top of the app's recipe, e.g. train.budget_minutes=2; repeatable")
    p.add_argument("--data-only", action="store_true", help="build and write the data, then stop")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("import", help="turn a Hugging Face model folder (or hub id) into a run directory")
    p.add_argument("source", help="folder in save_pretrained format (GPT-2, Llama, Mistral, Qwen2), or a hub id")
    p.add_argument("--out", required=True, help="run directory to create")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a run as a folder transformers loads, or a GGUF file for llama.cpp")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a save_pretrained folder; gguf: one file for llama.cpp, Ollama, LM Studio "
                        "(default %(default)s)")
    p.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="gguf: the matrices' storage type (default %(default)s)")
    p.add_argument("--out", required=True, help="folder (hf) or file (gguf) to create")
    p.set_defaults(func=cmd_export)
    return parser


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


def parse_intermixed(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with dotted overrides and flags in any order (``train a=1 -c recipe b=2``): argparse stops
    filling a positional list at the first flag, so the overrides after it are gathered here (argparse's
    own parse_intermixed_args does not support subcommands)."""
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [a for a in extra if not a.startswith("-") and "=" in a]
        extra = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _one_line_warning  # notes such as a skipped damaged checkpoint: one line each
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    parser = build_parser()
    args = parse_intermixed(parser, argv)
    args.argv = argv
    # Under torchrun every process meets the same error: rank 0 says it.
    say = print if os.environ.get("RANK", "0") == "0" else lambda *_a, **_k: None
    try:
        return args.func(args) or 0
    except UserError as e:
        say(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        say(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingHalted as e:
        say(f"lmforge {args.command}: halted: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        say(f"lmforge {args.command}: {e}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        where = f" '{e.filename}'" if e.filename else ""
        print(f"lmforge {args.command}: error: {e.strerror}{where} (a storage failure: free some space and run the "
              f"command again; a training run resumes with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
