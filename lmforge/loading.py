"""A trained model on disk -> model + tokenizer for inference.

Accepted paths: a run directory (its latest checkpoint is used), one checkpoint directory inside
``RUN/checkpoints/``, or a Hugging Face ``save_pretrained`` folder. What a run directory holds is
read from its ``run.json`` (:func:`lmforge.rundir.read_run_info`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import rundir
from lmforge.chat import ChatTemplate, find_chat_template
from lmforge.config import FinetuneConfig, TrainConfig, from_dict, load_yaml
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.interop import hf_folder_labels, is_hf_folder, load_hf
from lmforge.model import build_model, lora
from lmforge.model.classifier import SequenceClassifier, TokenClassifier
from lmforge.model.quantized import METHODS, QuantSpec, quantize_model
from lmforge.training.checkpoint import load_weights


@dataclass
class LoadedRun:
    model: torch.nn.Module
    """A :class:`~lmforge.model.gpt.GPT` or :class:`~lmforge.model.encoder.Encoder`, or for a classification run a
    :class:`SequenceClassifier`."""
    tokenizer: Tokenizer
    config: TrainConfig | FinetuneConfig
    checkpoint: Path
    folder: Path
    """The run directory, or the Hugging Face folder: where its chat template and labels live."""
    task: str = "lm"
    """'lm' (pretrained or SFT: generates text), 'mlm' (an encoder: fills in masked tokens), 'seq2seq' (an
    encoder-decoder: writes a target for a source), 'classify' or 'token_classify'."""
    labels: list[str] | None = None
    """Class names of a classification run, in class-id order."""


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run, checkpoint or Hugging Face folder, ready to use.

    A Hugging Face folder (config.json + safetensors + tokenizer.json) is converted in memory: a causal LM is an 'lm'
    run, a BERT an 'mlm' one, a BertForSequenceClassification a 'classify' one with its id2label as labels.
    """
    if is_hf_folder(path):
        model, tokenizer = load_hf(path)
        if tokenizer is None:
            raise UserError(f"'{path}' has no tokenizer.json (lmforge needs the fast-tokenizer file)")
        labels = hf_folder_labels(path) if isinstance(model, SequenceClassifier) else None
        cfg = model.backbone.cfg if labels is not None else model.cfg
        task = "classify" if labels is not None else rundir.backbone_task(cfg.arch)
        run = LoadedRun(model=model, tokenizer=tokenizer, config=TrainConfig(model=cfg), checkpoint=Path(path),
                        folder=Path(path), task=task, labels=labels)
    else:
        run_dir, ckpt = rundir.resolve_checkpoint(path)
        info = rundir.read_run_info(run_dir)
        run = _load_finetuned(run_dir, ckpt, info) if info.kind == "finetune" \
            else _load_pretrained(run_dir, ckpt, quant_spec(info))
    _check_finite(run.model, run.checkpoint)
    run.model.to(device).eval()
    return run


def load_lm(path: str | Path, device: str | torch.device = "cpu", command: str = "this command") -> LoadedRun:
    """:func:`load_run`, for a command that needs a decoder-only language model (chat, quantize, prune):
    UserError naming ``command`` for any other run."""
    run = load_run(path, device)
    _check_writes(run, path, command, ("lm",))
    return run


def load_writer(path: str | Path, device: str | torch.device = "cpu", command: str = "this command") -> LoadedRun:
    """:func:`load_run`, for a command that writes text (generate, eval --generate): a language model continues a
    prompt, an encoder-decoder writes a target for a source; UserError naming ``command`` for any other run."""
    run = load_run(path, device)
    _check_writes(run, path, command, ("lm", "seq2seq"))
    return run


def _check_writes(run: LoadedRun, path: str | Path, command: str, accepted: tuple[str, ...]) -> None:
    """UserError naming ``command`` and what it needs unless the run's task is one of ``accepted``."""
    if run.task in accepted:
        return
    needs = "a decoder-only language model" if "seq2seq" not in accepted else "a language model or an encoder-decoder"
    if run.task == "seq2seq":
        raise UserError(f"'{path}' is an encoder-decoder (model.arch=encoder_decoder): it writes a target for a "
                        f"source; {command} needs {needs}")
    if run.task == "mlm":
        raise UserError(f"'{path}' is an encoder (model.arch=encoder): it fills in masked tokens and feeds "
                        f"classifiers, it does not write text; {command} needs {needs}")
    raise UserError(f"'{path}' is a {run.task} run: it labels texts (lmforge predict); {command} needs {needs}")


def load_base(path: str | Path, command: str) -> LoadedRun:
    """:func:`load_run`, for a command that builds on a backbone (fine-tuning): a language model, an encoder or an
    encoder-decoder; UserError naming ``command`` for a run that already has a task head."""
    run = load_run(path)
    if run.task not in ("lm", "mlm", "seq2seq"):
        raise UserError(f"'{path}' is a {run.task} run: it labels texts (lmforge predict); {command} needs a "
                        f"language model, an encoder or an encoder-decoder")
    return run


def run_template(path: str | Path, run: LoadedRun) -> ChatTemplate:
    """The run's chat template, or lmforge's default with a note on stderr that it has none of its own."""
    if find_chat_template(run.folder) is None:
        print(f"note: '{path}' has no chat template of its own; using lmforge's default", file=sys.stderr)
    return ChatTemplate.resolve(None, run.folder, run.tokenizer)


def _check_finite(model: torch.nn.Module, source: Path) -> None:
    """UserError if any weight is NaN or infinite (a diverged run): such a model only produces noise."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"'{source}' holds non-finite weights ({name} has NaN or Inf): the run diverged; "
                            f"use an earlier checkpoint or train again with a lower optim.lr")


def quant_spec(info: rundir.RunInfo) -> QuantSpec | None:
    """How a run's weights are quantized (from its run.json), or None for float weights."""
    found = info.compression or {}
    if found.get("method") not in METHODS:
        return None
    return QuantSpec(found["method"], found.get("group_size", 32), found.get("include_embeddings", False))


def _load_pretrained(run_dir: Path, ckpt: Path, quantized: QuantSpec | None = None) -> LoadedRun:
    """A pretrained, imported or compressed model: a GPT (with integer Linears if quantized) and its weights."""
    cfg = from_dict(TrainConfig, load_yaml(run_dir / rundir.CONFIG))
    tokenizer = _run_tokenizer(run_dir, cfg.model.vocab_size)
    model = build_model(cfg.model)
    if quantized is not None:
        quantize_model(model, quantized, empty=True)
    load_weights(model, ckpt)
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, checkpoint=ckpt, folder=run_dir,
                     task=rundir.backbone_task(cfg.model.arch))


def _run_tokenizer(run_dir: Path, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(run_dir / rundir.TOKENIZER)
    tokenizer.check_fits(vocab_size)
    return tokenizer


def _load_finetuned(run_dir: Path, ckpt: Path, info: rundir.RunInfo) -> LoadedRun:
    """A fine-tuned model: full weights, or LoRA adapters merged into the base model's weights; a (token)
    classification run's backbone carries its head, whose size its labels.json gives."""
    cfg = from_dict(FinetuneConfig, load_yaml(run_dir / rundir.CONFIG))
    tokenizer = _run_tokenizer(run_dir, cfg.model.vocab_size)
    head = {"classify": SequenceClassifier, "token_classify": TokenClassifier}.get(info.task)
    labels = rundir.load_labels(run_dir) if head is not None else None
    # A LoRA checkpoint holds adapters, and full weights too if the run was written with --merge.
    full = not info.lora or (ckpt / rundir.WEIGHTS).is_file()
    backbone = build_model(cfg.model) if full else load_run(cfg.base).model
    model = backbone if head is None else head(backbone, len(labels))
    if full:
        load_weights(model, ckpt)
    else:
        model = lora.apply_lora(model, cfg.lora, ["score"] if labels is not None else None)
        lora.load_adapter(model, ckpt / rundir.ADAPTER)
        model = lora.merge(model)
    return LoadedRun(model=model, tokenizer=tokenizer, config=cfg, checkpoint=ckpt, folder=run_dir,
                     task=info.task if head is not None else rundir.backbone_task(cfg.model.arch), labels=labels)
