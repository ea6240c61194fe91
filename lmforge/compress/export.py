"""``lmforge export``: a run out to another runtime, in one of two formats. The writers live with their format:
Hugging Face folders in :func:`lmforge.interop.export_hf` (beside import), GGUF files in
:func:`lmforge.compress.gguf.export_gguf`; this module loads the run and picks the writer."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge import rundir
from lmforge.chat import ChatTemplate, find_chat_template
from lmforge.compress.gguf import export_gguf
from lmforge.compress.options import ExportOptions
from lmforge.compress.report import format_report, gguf_report
from lmforge.errors import UserError
from lmforge.interop import export_hf
from lmforge.loading import load_run
from lmforge.model.hf import AUTO_CLASSES
from lmforge.model.quantized import dequantized, is_quantized


def export_run(o: ExportOptions) -> Path:
    """Write the run (its latest checkpoint, or the checkpoint named) as ``o.format``; returns what was written.
    Quantized weights go out dequantized to float: neither format holds lmforge's integer layout. An encoder goes
    out as BERT (BertForMaskedLM), a classification run on one as BertForSequenceClassification with its labels; a
    classification run on a decoder as its fine-tuned transformer under its language-model head: neither format's
    causal LM has a label head. An encoder-decoder (pretrained or fine-tuned) goes out as BART
    (BartForConditionalGeneration). GGUF (llama.cpp) holds decoders only."""
    run = load_run(o.run, "cpu")
    model, note, labels = run.model, "", None
    arch = run.config.model.arch
    encoder = arch == "encoder"
    if run.task == "token_classify":
        raise UserError(f"'{o.run}' is a token_classify run: exporting its tagging head is not supported (lmforge "
                        f"predict tags texts with it)")
    if arch != "decoder" and o.format == "gguf":
        kind = arch.replace("_", "-")
        raise UserError(f"'{o.run}' is an {kind} (model.arch={arch}): GGUF files hold decoders for llama.cpp; "
                        f"export it as a Hugging Face folder (--format hf)")
    if run.task == "classify" and encoder:
        labels = run.labels  # whole, as BertForSequenceClassification
    elif run.task == "classify":
        model = run.model.backbone
        note = " (its transformer only)"
        print(f"note: '{o.run}' is a classification run: its label head ({len(run.labels or [])} labels) is not a "
              f"causal LM, so the export holds its fine-tuned transformer with its language-model head (unused by "
              f"the classifier) and no labels; lmforge predict labels texts", file=sys.stderr)
    if is_quantized(model):
        model, note = dequantized(model), " (its quantized weights dequantized to float)"
    template = find_chat_template(run.folder)
    if o.format == "hf":
        out = export_hf(model, run.tokenizer, o.out, chat_template=template, labels=labels)
        auto = AUTO_CLASSES["classify" if labels is not None else rundir.backbone_task(model.cfg.arch)]
        print(f"exported {run.checkpoint}{note} to {out} (transformers: {auto}.from_pretrained('{out}'))")
        return out
    # A run without a template of its own chats in lmforge's default (as `lmforge serve` does): the file carries
    # it, or llama.cpp would format chats in a template of its own choosing (llama-cpp-python: llama-2's).
    chat = ChatTemplate.resolve(None, run.folder, run.tokenizer)
    out = export_gguf(model, run.tokenizer, o.out, o.type, name=run.folder.name, chat_template=chat.source,
                      turn_end=chat.eos_token)
    report = gguf_report(run, model, out, o.type)
    print(format_report(report))
    where = report.write_to(out.with_name(out.name + ".report.json"))
    # The file's template is Jinja: llama.cpp's own engine renders it only with --jinja.
    default = "; its chat template lmforge's default, the run having none of its own" if template is None else ""
    print(f"\nexported {run.checkpoint}{note} to {out} ({o.type}{default}; llama.cpp: llama-cli -m {out} --jinja); "
          f"report {where}")
    return out
