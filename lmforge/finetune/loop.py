"""``lmforge finetune``: start from a trained model and adapt it (SFT or classification, full or LoRA).

The optimisation loop, checkpoints, metrics and resume are pretraining's (:mod:`lmforge.train`);
this module builds what differs: the examples, the batches, the loss, the evaluation and, for LoRA
runs, adapter-only checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from lmforge.config import FinetuneConfig, save_yaml
from lmforge.data.loader import EpochSampler, to_device
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.finetune import classify, lora, sft
from lmforge.finetune.records import ReadReport, read_records, require, split_holdout
from lmforge.model.gpt import GPT, flops_per_token
from lmforge.run import load_run
from lmforge.train.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from lmforge.train.loop import open_run_dir
from lmforge.train.metrics import MetricsLogger, format_duration, peak_flops
from lmforge.train.optim import build_optimizer
from lmforge.train.runtime import Runtime, maybe_compile, setup_runtime
from lmforge.train.steps import Job, format_metrics, run_steps


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int
    metrics: dict
    """The final evaluation (val loss; exact match or accuracy/F1/confusion matrix)."""
    train_time_s: float


@dataclass
class Task:
    """A fine-tuning task, ready for the loop: its model, data and metrics."""

    model: torch.nn.Module
    n_train: int
    batch: Callable[[list[int]], tuple[torch.Tensor, ...]]
    """Training items (by index) -> a micro-batch on the CPU."""
    loss: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    evaluate: Callable[[torch.nn.Module, bool], dict]
    """(model, final) -> metrics with val_loss; the final one adds the task's own figures."""
    summary: list[str]
    trainable_modules: list[str] | None = None
    """Modules trained in full even under LoRA (a new head)."""
    save_files: Callable[[Path], None] = lambda run_dir: None
    """Writes what the run directory needs beyond config and tokenizer (labels, chat template)."""


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune per ``cfg``; with ``resume``, continue the run in cfg.out_dir from its latest checkpoint."""
    tc = cfg.train
    rt = setup_runtime(tc.device, tc.precision, tc.threads, training=True)
    say = print if rt.is_main and progress else (lambda *a, **k: None)
    run_dir, ckpt = open_run_dir(cfg, resume)

    base = load_run(cfg.base)
    if base.task != "lm":
        raise UserError(f"base '{cfg.base}' is a {base.task} run; fine-tune from a language model")
    cfg.base = str(Path(cfg.base).resolve())
    cfg.model = dataclasses.replace(base.model.cfg)
    max_len = cfg.data.max_length or cfg.model.block_size
    if not 0 < max_len <= cfg.model.block_size:
        raise UserError(f"data.max_length={max_len} must be between 1 and the model's context "
                        f"({cfg.model.block_size})")
    torch.manual_seed(tc.seed + rt.rank)
    build = build_sft if cfg.task == "sft" else build_classifier
    task = build(cfg, base.model, base.tokenizer, base.folder, max_len, rt)
    for line in task.summary:
        say(line)

    model = task.model
    if cfg.lora.rank > 0:
        model = lora.apply_lora(model, cfg.lora, task.trainable_modules)
    model.to(rt.device)
    trainable, total = lora.trainable_fraction(model)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    state = {"best_val_loss": math.inf, "evals_without_improvement": 0, "train_time_s": 0.0}
    start_step = 0
    if ckpt is not None:
        if cfg.lora.rank > 0:
            lora.load_adapter(model, ckpt / lora.ADAPTER_FILE)
        else:
            load_weights(model, ckpt)
        state.update(load_trainer_state(ckpt, optimizer))
        start_step = state["step"]
        say(f"resuming from {ckpt} (step {start_step})")
    elif rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        base.tokenizer.save(run_dir / "tokenizer.json")
        task.save_files(run_dir)
    step_model = maybe_compile(model, tc.compile)

    n_params = sum(p.numel() for p in base.model.parameters())
    flops_tok = flops_per_token(cfg.model, n_params)
    peak, peak_source = peak_flops(rt.device, rt.autocast_dtype or torch.float32)
    say(f"run {run_dir} | {cfg.task} from {cfg.base} | trainable {trainable:,} of {total:,} parameters "
        f"({trainable / total:.2%}){' with LoRA rank ' + str(cfg.lora.rank) if cfg.lora.rank else ''} | "
        f"{rt.device} {rt.precision} | peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    logger = MetricsLogger(run_dir, rt.is_main, start_step)
    if ckpt is None and cfg.task == "sft" and cfg.data.eval_generations > 0:
        before = task.evaluate(step_model, True)  # the base model's answers, for comparison
        logger.log({"step": 0, "kind": "eval", **{k: v for k, v in before.items() if isinstance(v, float)}})
        say(f"before fine-tuning: val loss {before['val_loss']:.4f} | exact match {before['exact_match']:.1%}")

    sampler = EpochSampler(task.n_train, tc.batch_size, tc.seed, rt.rank, rt.world_size)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        step = start_step
        while True:
            for micro in range(tc.grad_accum):
                yield tuple(to_device(t, rt.device) for t in task.batch(sampler.indices(step, micro, tc.grad_accum)))
            step += 1

    def save(step: int, st: dict) -> Path:
        write = (lambda d: lora.save_adapter(model, d / lora.ADAPTER_FILE)) if cfg.lora.rank > 0 else None
        return save_checkpoint(run_dir, step, model, optimizer, st, tc.keep_last, write_weights=write)

    final_metrics: dict = {}

    def evaluate(final: bool) -> dict[str, float]:
        metrics = task.evaluate(step_model, final)
        if final:
            final_metrics.update(metrics)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    job = Job(model=model, optimizer=optimizer, scaler=rt.grad_scaler(), batches=batches(),
              loss=lambda b: task.loss(step_model, b), evaluate=evaluate, save=save,
              flops_per_token=flops_tok, peak_flops=peak)
    out = run_steps(job, cfg, rt, logger, state, start_step, say)

    if cfg.lora.rank > 0 and cfg.lora.merge and rt.is_main:
        write_merged(model, latest_checkpoint(run_dir))
        say(f"merged the adapters into full weights: {latest_checkpoint(run_dir)}/model.safetensors")
    if rt.is_main:
        (run_dir / "final_eval.json").write_text(json.dumps(final_metrics, indent=1) + "\n", encoding="utf-8")
    if "confusion_matrix" in final_metrics:
        say(classify.format_confusion(final_metrics["confusion_matrix"], classify.load_labels(run_dir)))
    say(f"done: {out.step} steps in {format_duration(out.train_time_s)} | val {format_metrics(final_metrics)} | "
        f"{run_dir}")
    return FinetuneResult(run_dir, out.step, final_metrics, out.train_time_s)


def write_merged(model: torch.nn.Module, ckpt: Path) -> None:
    """Add full weights (adapters merged) to a LoRA checkpoint, atomically; the adapters stay."""
    merged = lora.merge(model)
    tmp = ckpt / "model.safetensors.tmp"
    save_model(merged, str(tmp))
    tmp.replace(ckpt / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# SFT


def _examples_split(cfg: FinetuneConfig, convert: Callable, report: ReadReport) -> tuple[list, list]:
    """(train, val) records, converted: the val file, or a seeded hold-out of the training file."""
    d = cfg.data
    train = read_records(d.train, convert, d.skip_bad_lines, report)
    if d.val:
        return train, read_records(d.val, convert, d.skip_bad_lines, report)
    return split_holdout(train, d.val_fraction, d.seed)


def _skipped_lines(report: ReadReport) -> list[str]:
    if not report.skipped:
        return []
    return [f"skipped {len(report.skipped)} bad records, e.g. {report.skipped[0]}"]


def build_sft(cfg: FinetuneConfig, model: GPT, tokenizer: Tokenizer, base_dir: Path, max_len: int,
              rt: Runtime) -> Task:
    d = cfg.data
    template = sft.ChatTemplate.resolve(d.chat_template, base_dir, tokenizer)
    report = ReadReport()
    train_rec, val_rec = _examples_split(
        cfg, lambda r: sft.record_to_messages(r, d.prompt_field, d.response_field, d.messages_field), report)

    def encode(records: list) -> list[sft.Example]:
        return [sft.encode_example(m, tokenizer, template, max_len) for m, _ in records]

    train, val = encode(train_rec), encode(val_rec)
    unlearnable = [w for e, (_, w) in zip(train, train_rec, strict=True) if all(t == sft.IGNORE for t in e.targets)]
    if len(unlearnable) == len(train):
        raise UserError(f"no training example keeps an answer token within data.max_length={max_len}")
    n_trunc = sum(e.truncated for e in train + val)
    pad = tokenizer.eot_id
    rows = sft.pack_examples(train, max_len, pad) if d.packing else None
    summary = [f"sft: {len(train)} train / {len(val)} val examples from {d.train}"
               + (f" and {d.val}" if d.val else f" (val_fraction {d.val_fraction})"),
               f"tokens per example: max {max(len(e.inputs) for e in train)}, limit {max_len}; "
               f"{n_trunc} truncated" + (f", {len(unlearnable)} with no answer left (e.g. {unlearnable[0]})"
                                         if unlearnable else ""),
               f"batches: {'packed into ' + str(len(rows)) + ' rows' if rows else 'padded to the longest example'}"
               f" | chat template: {'lmforge default' if template.is_default else 'own'}, answers end with "
               f"{template.eos_token}",
               *_skipped_lines(report)]
    # Exact match: answer the val prompts whose last turn is the answer.
    qa = [(m[:-1], m[-1]["content"]) for m, _ in val_rec if m[-1]["role"] == "assistant"][:d.eval_generations]
    prompts = [tokenizer.encode(template.render(m, add_generation_prompt=True), allow_special=True) for m, _ in qa]
    max_answer = max((len(tokenizer.encode(a)) for _, a in qa), default=0) + 8

    def batch(indices: list[int]) -> tuple[torch.Tensor, ...]:
        if rows is not None:
            return sft.packed_batch([rows[i] for i in indices])
        return sft.pad_batch([train[i] for i in indices], pad)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module, final: bool) -> dict:
        was = m.training
        m.eval()
        total, count = 0.0, 0
        for i in range(0, len(val), cfg.train.batch_size):
            x, y = (t.to(rt.device) for t in sft.pad_batch(val[i:i + cfg.train.batch_size], pad))
            n = int((y != sft.IGNORE).sum())
            if n:
                with rt.autocast():
                    total += float(m(x, y)[1]) * n
                count += n
        loss = total / max(1, count)
        metrics: dict = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        if final and qa:
            answers = _generate_answers(m, prompts, max_answer, tokenizer, template.stop_ids, rt)
            hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, qa, strict=True)]
            metrics["exact_match"] = sum(hits) / len(hits)
            metrics["samples"] = [{"prompt": p[-1]["content"] if p else "", "reference": ref, "answer": a}
                                  for a, (p, ref) in list(zip(answers, qa, strict=True))[:5]]
        m.train(was)
        return metrics

    def save_files(run_dir: Path) -> None:
        template.save(run_dir)

    return Task(model=model, n_train=len(rows) if rows is not None else len(train), batch=batch,
                loss=sft.sft_loss, evaluate=evaluate, summary=summary, save_files=save_files)


def _generate_answers(model: torch.nn.Module, prompts: list[list[int]], max_new: int, tokenizer: Tokenizer,
                      stop_ids: list[int], rt: Runtime, batch_size: int = 16) -> list[str]:
    """Greedy answers to tokenized prompts, stopping at the end-of-answer token."""
    from lmforge.generate import generate

    gpt = _unwrap(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        with rt.autocast():
            ids = generate(gpt, prompts[i:i + batch_size], max_new, temperature=0.0, stop_ids=stop_ids,
                           pad_id=tokenizer.eot_id)
        out += [tokenizer.decode(x) for x in ids]
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the KV cache methods: past torch.compile's and peft's wrappers."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


# --------------------------------------------------------------------------------------------------
# Classification


def build_classifier(cfg: FinetuneConfig, model: GPT, tokenizer: Tokenizer, base_dir: Path, max_len: int,
                     rt: Runtime) -> Task:
    d = cfg.data

    def convert(r: dict) -> tuple[str, str]:
        label = require(r, d.label_field, (str, int, bool))
        return require(r, d.text_field), str(label)

    report = ReadReport()
    train_rec, val_rec = _examples_split(cfg, convert, report)
    labels = sorted({label for (_, label), _ in train_rec})
    if len(labels) < 2:
        raise UserError(f"'{d.train}' has {len(labels)} distinct label(s) in field '{d.label_field}': "
                        f"classification needs at least 2")
    index = {label: i for i, label in enumerate(labels)}
    for (_, label), where in val_rec:
        if label not in index:
            raise UserError(f"{where}: label {label!r} never occurs in the training examples "
                            f"(known: {', '.join(labels)})")
    train_ids, t1 = classify.encode_texts([t for (t, _), _ in train_rec], tokenizer, max_len)
    val_ids, t2 = classify.encode_texts([t for (t, _), _ in val_rec], tokenizer, max_len)
    y_train = [index[label] for (_, label), _ in train_rec]
    y_val = [index[label] for (_, label), _ in val_rec]
    weight = classify.class_weight_tensor(cfg.class_weights, y_train, len(labels))
    majority = max(y_val.count(c) for c in range(len(labels))) / len(y_val)
    summary = [f"classify: {len(train_ids)} train / {len(val_ids)} val texts, {len(labels)} classes "
               f"({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})",
               f"{t1 + t2} texts truncated to {max_len} tokens | majority-class val accuracy {majority:.1%}",
               *_skipped_lines(report)]
    pad = tokenizer.eot_id

    def batch(indices: list[int]) -> tuple[torch.Tensor, ...]:
        x, lengths = classify.text_batch([train_ids[i] for i in indices], pad)
        return x, lengths, torch.tensor([y_train[i] for i in indices])

    @torch.no_grad()
    def evaluate(m: torch.nn.Module, final: bool) -> dict:
        was = m.training
        m.eval()
        losses, preds = [], []
        for i in range(0, len(val_ids), cfg.train.batch_size):
            x, lengths = classify.text_batch(val_ids[i:i + cfg.train.batch_size], pad)
            y = torch.tensor(y_val[i:i + cfg.train.batch_size])
            with rt.autocast():
                logits = m(x.to(rt.device), lengths.to(rt.device)).float().cpu()
            losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item())
            preds += logits.argmax(-1).tolist()
        m.train(was)
        metrics = classify.classification_metrics(y_val, preds, len(labels))
        if not final:
            metrics.pop("confusion_matrix")
        return {"val_loss": sum(losses) / len(y_val), **{f"val_{k}" if k != "confusion_matrix" else k: v
                                                          for k, v in metrics.items()}}

    return Task(model=classify.SequenceClassifier(model, len(labels)), n_train=len(train_ids), batch=batch,
                loss=lambda m, b: classify.classification_loss(m, b, weight), evaluate=evaluate,
                summary=summary, trainable_modules=["score"],
                save_files=lambda run_dir: classify.save_labels(run_dir, labels))
