"""``lmforge eval``: run the requested evaluations on one model and report them as a table and JSON."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge import rundir
from lmforge.chat import ChatTemplate
from lmforge.config import TrainConfig
from lmforge.errors import UserError
from lmforge.evaluate import lm, tasks
from lmforge.evaluate.options import EvalOptions, EvalRequest
from lmforge.evaluate.predict import gold_ids, label_probabilities, read_texts
from lmforge.evaluate.seq2seq import score_pairs
from lmforge.generate import generate_text
from lmforge.generate_seq2seq import generate_targets
from lmforge.loading import LoadedRun, load_run
from lmforge.runtime import Runtime, setup_runtime


def evaluate_run(path: str, req: EvalRequest, device: str = "auto", precision: str = "auto",
                 progress: bool = True) -> dict:
    """Every requested evaluation of the model at ``path``; the JSON-ready report. Nothing requested: a
    pretraining run's own val split (the prepared dataset it trained on)."""
    rt = setup_runtime(device, precision)
    run = load_run(path, rt.device)
    if not (req.lm or req.dataset or req.pairs or req.generate or req.choice or req.classify):
        own = run.config.data.dataset_dir if isinstance(run.config, TrainConfig) else None
        if not (own and Path(own, "meta.json").is_file()):
            raise UserError(f"nothing to evaluate: '{path}' names no prepared dataset of its own; give --lm FILES, "
                            f"--dataset DIR, --pairs FILE, --generate FILE, --choice FILE or --classify FILE")
        req = replace(req, dataset=own)
    model = run.model
    if run.task == "classify" and (req.lm or req.dataset or req.generate or req.choice):
        raise UserError(f"'{path}' is a classification run: only --classify applies to it")
    if run.task == "token_classify":
        raise UserError(f"'{path}' is a token-classification run: lmforge predict {path} --file WORDS.jsonl tags words "
                        f"and scores them where the records have tags")
    if req.classify and run.task != "classify":
        what = "an encoder" if run.task == "mlm" else "a language model"
        raise UserError(f"--classify needs a classification run; '{path}' is {what}")
    if run.task == "mlm" and (req.lm or req.generate or req.choice):
        raise UserError(f"'{path}' is an encoder (model.arch=encoder): --lm, --generate and --choice score or write "
                        f"text left to right, which it does not; --dataset DIR (masked-LM loss, accuracy, "
                        f"pseudo-perplexity) applies")
    if req.pairs and run.task != "seq2seq":
        raise UserError(f"--pairs scores an encoder-decoder's targets given their sources; '{path}' is not one "
                        f"(model.arch={run.config.model.arch}): --generate FILE scores what it writes for each prompt")
    if run.task == "seq2seq" and (req.lm or req.choice):
        raise UserError(f"'{path}' is an encoder-decoder (model.arch=encoder_decoder): --lm and --choice score text "
                        f"left to right with a decoder-only model; --generate FILE (its prompts the sources) applies")
    report: dict = {"model": str(path), "checkpoint": str(run.checkpoint), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "device": str(rt.device), "precision": rt.precision, "results": {}}
    results = report["results"]
    if req.lm:
        bar = tqdm(unit="B", unit_scale=True, desc="scoring", disable=not progress, file=sys.stderr)
        score = lm.score_texts(model, run.tokenizer, lm.documents(req.lm, req.text_field), stride=req.stride,
                               batch_size=req.batch_size, device=rt.device, autocast=rt.autocast, progress=bar.update)
        bar.close()
        results["lm"] = {**score.as_dict(), "sources": req.lm, "stride": req.stride or model.cfg.block_size,
                         "context": model.cfg.block_size}
    if req.dataset and run.task == "mlm":
        tc = run.config.train  # the run's batches, seed and masking rate: training's final evaluation, repeated
        results["dataset"] = {**lm.score_masked_split(model, run.tokenizer, req.dataset, rt, req.split, tc.batch_size,
                                                      tc.seed, tc.mlm_probability), "dataset": req.dataset}
    elif req.dataset and run.task == "seq2seq":
        # A pretraining run's own noise settings, batches and seed: training's final evaluation, repeated (defaults
        # for a fine-tuned or imported model, which has none).
        tc = run.config.train if isinstance(run.config, TrainConfig) else TrainConfig().train
        results["dataset"] = {**lm.score_denoising_split(model, run.tokenizer, req.dataset, rt, req.split,
                                                         tc.batch_size, tc.seed, tc.noise_density,
                                                         tc.mean_noise_span), "dataset": req.dataset}
    elif req.dataset:
        results["dataset"] = {**lm.score_split(model, req.dataset, rt, req.split, req.batch_size),
                              "dataset": req.dataset}
    if req.pairs:
        results["pairs"] = score_pairs(model, run.tokenizer, req.pairs, rt, req.batch_size)
    if req.generate:
        results["generate"] = _generation(model, run, req, rt, progress)
    if req.choice:
        items = tasks.read_choice_task(req.choice)
        if progress:  # one batched pass over every (context, choice) pair
            print(f"scoring {sum(len(c) for _, c, _ in items):,} choices of {len(items):,} questions ...",
                  file=sys.stderr, flush=True)
        with rt.autocast():
            results["choice"] = {**tasks.multiple_choice(model, run.tokenizer, items, req.batch_size, rt.device),
                                 "file": req.choice, "data_sha256": tasks.file_sha256(req.choice)}
    if req.classify:
        results["classify"] = _classification(run, req)
    return report


def _generation(model: torch.nn.Module, run: LoadedRun, req: EvalRequest, rt: Runtime, progress: bool) -> dict:
    """--generate: each prompt's answer (an encoder-decoder's: the target it writes for the prompt as its source)
    scored against its references."""
    items = tasks.read_generation_task(req.generate)
    prompts = [p for p, _ in items]
    seq2seq = run.task == "seq2seq"
    if seq2seq and req.chat:
        raise UserError("--chat: an encoder-decoder reads each prompt as its source, with no chat template; drop "
                        "--chat")
    if not seq2seq and req.search.beams > 1:
        raise UserError("--beams: beam search is for encoder-decoder runs; this is a decoder-only language model "
                        "(drop --beams)")
    chat: dict = {}
    if req.chat:
        template = ChatTemplate.resolve(None, run.folder, run.tokenizer)
        prompts = [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        chat = {"stop_ids": template.stop_ids, "allow_special": True}
    outputs: list[str] = []
    bar = tqdm(total=len(items), unit="prompt", desc="generating", disable=not progress, file=sys.stderr)
    if seq2seq:  # one call, batched inside: its warning counts the sources cut in the whole file
        with rt.autocast():
            outputs = generate_targets(model, run.tokenizer, prompts, req.max_new_tokens, req.sampling, req.search,
                                       stop_strings=req.stop, batch_size=req.batch_size, progress=bar.update)
    else:
        for i in range(0, len(items), req.batch_size):
            with rt.autocast():
                outputs += generate_text(model, run.tokenizer, prompts[i:i + req.batch_size], req.max_new_tokens,
                                         req.sampling, stop_strings=req.stop, **chat)
            bar.update(len(items[i:i + req.batch_size]))
    bar.close()
    metrics = tasks.generation_metrics(outputs, [refs for _, refs in items])
    return {**metrics, "file": req.generate, "data_sha256": tasks.file_sha256(req.generate),
            "settings": {"max_new_tokens": req.max_new_tokens, "stop": req.stop, "chat": req.chat,
                         **asdict(req.sampling), **asdict(req.search)},
            "outputs": outputs,
            "samples": [{"prompt": p, "output": o, "references": r}
                        for (p, r), o in list(zip(items, outputs, strict=True))[:5]]}


def _classification(run: LoadedRun, req: EvalRequest) -> dict:
    texts, gold = read_texts(req.classify, req.text_field, req.label_field)
    if gold is None:
        raise UserError(f"'{req.classify}' needs a '{req.label_field}' field on every record to be evaluated")
    labels = run.labels
    truth = gold_ids(gold, labels)
    pred = label_probabilities(run, texts)[0].argmax(-1).tolist()
    metrics = tasks.classification_metrics(truth, pred, len(labels))
    return {**metrics, "labels": labels, "examples": len(texts), "file": req.classify,
            "data_sha256": tasks.file_sha256(req.classify)}


def format_report(report: dict) -> str:
    """The scalar results as a two-column table, one block per evaluation."""
    lines = [f"model {report['model']} ({report['device']}, {report['precision']})"]
    for name, res in report["results"].items():
        lines.append(f"\n[{name}]")
        for k, v in res.items():
            if isinstance(v, float):
                lines.append(f"  {k:<16} {v:.4f}")
            elif isinstance(v, int) and not isinstance(v, bool):
                lines.append(f"  {k:<16} {v:,}")
        if "confusion_matrix" in res:
            lines.append(tasks.format_confusion(res["confusion_matrix"], res["labels"]))
    return "\n".join(lines)


def report_path(output: str | None, run_path: str) -> Path:
    """Where the JSON report goes: --output, else eval.json in the run directory (or here for other
    models); UserError if that is a folder. Checked before any evaluation runs."""
    if output:
        out = Path(output)
    else:
        run = Path(run_path)
        out = (run if rundir.is_run_dir(run) else Path(".")) / "eval.json"
    if out.is_dir():
        raise UserError(f"--output '{out}' is a folder (expected the path of a .json file)")
    return out


def write_report(report: dict, out: Path) -> Path:
    """Write the JSON report to ``out`` (see :func:`report_path`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return out


def evaluate_command(o: EvalOptions) -> None:
    """``lmforge eval``: evaluate, print the table, write the JSON report (its path checked first)."""
    out = report_path(o.output, o.run)
    report = evaluate_run(o.run, o.request, o.device, o.precision)
    print(format_report(report))
    print(f"\nwrote {write_report(report, out)}")
