"""Task evaluations: generation (BLEU, chrF, ROUGE, exact match), multiple choice, and
classification (accuracy, macro precision/recall/F1, confusion matrix). The metrics come from the
libraries everyone reports with (``sacrebleu``, ``rouge-score``, ``scikit-learn``), called on our
outputs, never re-implemented.
"""

from __future__ import annotations

import hashlib
import re
import string
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.records import BadRecord, read_records, require
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError

_PUNCTUATION = frozenset(string.punctuation)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Generation


def read_generation_task(path: str) -> list[tuple[str, list[str]]]:
    """(prompt, references) of each record: ``prompt`` plus ``reference`` or ``references``."""

    def convert(r: dict) -> tuple[str, list[str]]:
        prompt = require(r, "prompt")
        if "references" in r:
            refs = require(r, "references", list)
            if not refs or not all(isinstance(x, str) for x in refs):
                raise BadRecord("field 'references' should be a non-empty list of strings")
            return prompt, refs
        if "reference" not in r:
            raise BadRecord("expected a 'reference' (text) or 'references' (list of texts) field")
        return prompt, [require(r, "reference")]

    return [x for x, _ in read_records(path, convert, skip_bad_lines=False)]


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation (its v1.1 evaluation script): lower case, no punctuation, no articles,
    single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores(hypothesis: str, references: list[str]) -> tuple[float, float]:
    """(exact match, token F1) of one answer, SQuAD style: normalised, the best over the references."""
    hyp = squad_normalize(hypothesis).split()
    em = f1 = 0.0
    for ref in references:
        gold = squad_normalize(ref).split()
        em = max(em, float(hyp == gold))
        common = sum((Counter(hyp) & Counter(gold)).values())
        if common:
            precision, recall = common / len(hyp), common / len(gold)
            f1 = max(f1, 2 * precision * recall / (precision + recall))
        elif not hyp and not gold:
            f1 = max(f1, 1.0)
    return em, f1


def generation_metrics(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-1/2/L F1 (rouge-score, best reference), exact match
    (verbatim), and SQuAD's normalised exact match and token F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; a segment with fewer references repeats its last one.
    streams = [[refs[min(i, len(refs) - 1)] for refs in references] for i in range(n_refs)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi(refs, hyp)
        for k in rouge:
            rouge[k] += scores[k].fmeasure
    n = len(hypotheses)
    squad = [squad_scores(h, refs) for h, refs in zip(hypotheses, references, strict=True)]
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
            **{k: 100 * v / n for k, v in rouge.items()},
            "exact_match": 100 * sum(h.strip() in {r.strip() for r in refs}
                                     for h, refs in zip(hypotheses, references, strict=True)) / n,
            "squad_em": 100 * sum(em for em, _ in squad) / n, "squad_f1": 100 * sum(f1 for _, f1 in squad) / n,
            "examples": n}


# --------------------------------------------------------------------------------------------------
# Log-likelihoods (multiple choice here; the lm-evaluation-harness adapter uses them too)


def split_encode(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, tokenized together where the boundary allows it."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx or [tokenizer.eot_id], whole[len(ctx):]
    return ctx or [tokenizer.eot_id], tokenizer.encode(continuation)


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding would produce it) for each pair.

    Context is left-truncated so that context + continuation fits the model's context.
    """
    block = model.cfg.block_size
    out: list[tuple[float, bool]] = []
    for i in range(0, len(pairs), batch_size):
        rows = []
        for ctx, cont in pairs[i:i + batch_size]:
            if not cont:
                raise UserError("an empty continuation has no likelihood to score")
            seq = (ctx + cont)[-(block + 1):]
            rows.append((seq, min(len(cont), len(seq) - 1)))
        T = max(len(s) for s, _ in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for j, (seq, _) in enumerate(rows):
            x[j, :len(seq) - 1] = torch.tensor(seq[:-1])
        logp = F.log_softmax(model(x.to(device))[0].float(), dim=-1).cpu()
        for j, (seq, n) in enumerate(rows):
            pos = torch.arange(len(seq) - 1 - n, len(seq) - 1)
            target = torch.tensor(seq[-n:])
            lp = logp[j, pos]
            out.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
    return out


def read_choice_task(path: str) -> list[tuple[str, list[str], int]]:
    def convert(r: dict) -> tuple[str, list[str], int]:
        choices = require(r, "choices", list)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise BadRecord("field 'choices' should be a list of at least 2 strings")
        label = require(r, "label", int)
        if not 0 <= label < len(choices):
            raise BadRecord(f"label {label} is not an index into the {len(choices)} choices")
        return require(r, "context"), choices, label

    return [x for x, _ in read_records(path, convert, skip_bad_lines=False)]


def multiple_choice(model: torch.nn.Module, tokenizer: Tokenizer, items: list[tuple[str, list[str], int]],
                    batch_size: int = 16, device: torch.device | str = "cpu") -> dict:
    """Accuracy of picking the most likely choice: by total log-likelihood, and per byte (acc_norm).

    A context + choice longer than the model's context is cut from the left, as lm-evaluation-harness does
    (a choice longer than the context itself is scored on its last tokens only); the questions where that
    happened are counted (``truncated_questions``) and a warning says how many.
    """
    pairs = [split_encode(tokenizer, context, c) for context, choices, _ in items for c in choices]
    lls = loglikelihoods(model, pairs, batch_size, device)
    block = model.cfg.block_size
    correct = correct_norm = truncated = 0
    j = 0
    for _, choices, label in items:
        # block + 1 tokens fit: the first is only ever an input.
        truncated += any(len(ctx) + len(cont) > block + 1 for ctx, cont in pairs[j:j + len(choices)])
        ll = [lls[j + m][0] for m in range(len(choices))]
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, choices, strict=True)]
        correct += max(range(len(ll)), key=ll.__getitem__) == label
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == label
        j += len(choices)
    n = len(items)
    if truncated:
        warnings.warn(f"{truncated} of {n} questions have a context + choice longer than the model's context "
                      f"({block} tokens): scored on their last {block + 1} tokens, the context cut from the left",
                      stacklevel=2)
    chance = sum(1 / len(c) for _, c, _ in items) / n
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "chance": chance, "examples": n,
            "truncated_questions": truncated}


# --------------------------------------------------------------------------------------------------
# Classification


def classification_metrics(y_true: list[int], y_pred: list[int], n_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 (scikit-learn) and the confusion matrix (rows: true)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(n_classes))
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_precision": float(p),
            "macro_recall": float(r), "macro_f1": float(f1),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist()}


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    width = max(6, *(len(s) for s in labels))
    header = " ".join(f"{s[:width]:>{width}}" for s in labels)
    lines = [" " * width + " " + header + "   (rows: true, columns: predicted)"]
    for name, row in zip(labels, matrix, strict=True):
        lines.append(f"{name[:width]:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
