"""``lmforge predict``: label texts with a classification run, or tag their words with a token classification run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.data.records import BadRecord, read_records, read_text_file, require
from lmforge.data.words import EncodedWords, encode_words, tagged_words
from lmforge.errors import UserError
from lmforge.evaluate.options import PredictOptions
from lmforge.evaluate.tasks import classification_metrics, format_confusion
from lmforge.loading import LoadedRun, load_run
from lmforge.model.classifier import class_probabilities, word_logits
from lmforge.runtime import setup_runtime


def read_texts(file: str, text_field: str, label_field: str) -> tuple[list[str], list[tuple[str, str]] | None]:
    """Texts of a .txt (one per line), .jsonl or .csv file, and their (label, where) if every record has one."""
    path = Path(file)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        return [line for line in read_text_file(file, "--file").splitlines() if line.strip()], None

    def convert(r: dict) -> tuple[str, str | None]:
        label = r.get(label_field)
        if label is not None and not isinstance(label, str | int | bool):
            raise BadRecord(f"field '{label_field}' should be a string or number")
        return require(r, text_field), None if label is None else str(label)

    records = read_records(path, convert, skip_bad_lines=False)
    texts = [text for (text, _), _ in records]
    if all(label is not None for (_, label), _ in records):
        return texts, [(label, where) for (_, label), where in records]
    return texts, None


def gold_ids(gold: list[tuple[str, str]], labels: list[str]) -> list[int]:
    """Class ids of known labels; a label the model never saw in training is an error naming its line."""
    index = {label: i for i, label in enumerate(labels)}
    for label, where in gold:
        if label not in index:
            raise UserError(f"{where}: label {label!r} was never seen in training "
                            f"(the model knows: {', '.join(labels)})")
    return [index[label] for label, _ in gold]


def label_probabilities(run: LoadedRun, texts: list[str]) -> tuple[torch.Tensor, int]:
    """(class probabilities (N, C), texts cut to the context) of a classification run."""
    framed = run.config.model.arch == "encoder"  # [CLS] text [SEP], as the classifier was trained
    ids, truncated = run.tokenizer.encode_texts(texts, run.config.model.block_size, framed)
    return class_probabilities(run.model, ids, run.tokenizer.pad_id(framed)), truncated


def tag_words(o: PredictOptions, run: LoadedRun) -> None:
    """``lmforge predict`` on a token_classify run: a tag per word of each --text (split at whitespace) and each
    record of a JSONL --file (its words in the run's data.tokens_field; with data.tags_field in every record, word
    accuracy too), framed as in fine-tuning (:func:`encode_words`). A word past the context gets no tag (null)."""
    d, labels, framed = run.config.data, run.labels, run.config.model.arch == "encoder"
    read = tagged_words(d.tokens_field, d.tags_field, tags_required=False)

    def convert(r: dict) -> tuple[list[str], EncodedWords, list[str] | None]:
        words, tags = read(r)
        return words, encode_words(run.tokenizer, words, run.config.model.block_size, framed), tags

    records = []
    for text in o.text:
        if not text.split():  # the only way a text's words can be unusable
            raise UserError(f"--text {text!r} has no words to tag")
        records.append((convert({d.tokens_field: text.split()}), "--text"))
    if o.file:
        if Path(o.file).suffix.lower() != ".jsonl":
            raise UserError(f"--file '{o.file}': a token_classify run tags JSONL records ('{d.tokens_field}': a list "
                            f"of words)")
        records += read_records(o.file, convert, skip_bad_lines=False)
    logits = word_logits(run.model, [x.ids for (_, x, _), _ in records], [x.firsts for (_, x, _), _ in records],
                         run.tokenizer.pad_id(framed))
    best = [lg.argmax(-1).tolist() for lg in logits]
    rows = [{"tokens": words, "tags": [labels[c] for c in b] + [None] * (len(words) - len(b))}
            for ((words, _, _), _), b in zip(records, best, strict=True)]
    for r in rows[:50] if o.output else rows:
        print(" ".join(f"{w}/{t}" for w, t in zip(r["tokens"], r["tags"], strict=True)))
    if any(x.truncated for (_, x, _), _ in records):
        print(f"note: {sum(x.truncated for (_, x, _), _ in records)} texts were longer than the context: their last "
              f"words have no tag")
    if all(tags is not None for (_, _, tags), _ in records):
        truth = gold_ids([(t, w) for (_, x, tags), w in records for t in tags[:len(x.firsts)]], labels)
        m = classification_metrics(truth, [c for b in best for c in b], len(labels))
        print(f"word accuracy {m['accuracy']:.4f} | macro F1 {m['macro_f1']:.4f} over {len(truth)} tagged words")
        print(format_confusion(m["confusion_matrix"], labels))
    if o.output:
        Path(o.output).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} tagged texts to {o.output}")


def predict_command(o: PredictOptions) -> None:
    """``lmforge predict``: label the texts, print them (and metrics if they have labels), write JSONL."""
    if not o.text and not o.file:
        raise UserError("nothing to label: give --text TEXT or --file FILE")
    if o.output and Path(o.output).is_dir():
        raise UserError(f"--output '{o.output}' is a folder (expected the path of a .jsonl file)")
    rt = setup_runtime(o.device, "fp32")
    run = load_run(o.run, rt.device)
    if run.task == "token_classify":  # its records hold words, not texts
        return tag_words(o, run)
    texts, output, gold = list(o.text), o.output, None
    if o.file:
        more, gold = read_texts(o.file, o.text_field, o.label_field)
        texts = texts + more
        if gold is not None and len(more) != len(texts):
            gold = None  # --text entries have no labels
    if not texts:
        raise UserError(f"nothing to label: '{o.file}' holds no text")
    if run.task != "classify" or run.labels is None:
        raise UserError(f"'{o.run}' is not a classification run (fine-tune one with task=classify or "
                        f"task=token_classify)")
    labels = run.labels
    truth = gold_ids(gold, labels) if gold is not None else None
    probs, truncated = label_probabilities(run, texts)
    best = probs.argmax(-1).tolist()
    rows = [{"text": t, "label": labels[c], "probability": round(float(probs[i, c]), 4)}
            for i, (t, c) in enumerate(zip(texts, best, strict=True))]
    if output:
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for r in rows[:50] if output else rows:
        snippet = r["text"].replace("\n", " ")
        print(f"{r['label']}\t{r['probability']:.3f}\t{snippet[:80]}")
    if truncated:
        print(f"note: {truncated} texts were longer than the context and were cut to its first tokens")
    if truth is not None:
        m = classification_metrics(truth, best, len(labels))
        print(f"accuracy {m['accuracy']:.4f} | macro F1 {m['macro_f1']:.4f} over {len(truth)} labelled texts")
        print(format_confusion(m["confusion_matrix"], labels))
    if output:
        print(f"wrote {len(rows)} predictions to {output}")
