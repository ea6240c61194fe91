"""Speculative decoding's speed: plain greedy vs prompt lookup vs a draft run, batch 1, on code and chat prompts.

    python bench/speculative.py --run RUN [--draft DRAFT_RUN] [--lookup 3] [--draft-tokens 4] [--new-tokens 96]
                                [--reps 3] [--threads 2] [--precision fp32|bf16] [--json out.json]

The code prompts are the openings of functions from this Python's standard library (the default recipe's
corpus, so the model has seen such code); the chat prompts are user turns in the run's chat template (lmforge's
default when it has none) that ask about a piece of text they quote, as chat requests often do. Each generation
is greedy, batch 1, ``--new-tokens`` tokens at most (the end-of-text id or the template's stop ids end it); the
methods alternate within each repetition (their order rotating), after one untimed warm-up round, and each figure
is the median of ``--reps`` timed generations of every prompt of the kind, with the lowest and highest.
Tokens/s counts new tokens over wall time, the prompt's forward included. Every method's tokens are compared
with plain decoding's: they must be equal (a near-tie rounded differently in the last bits is reported, never
hidden).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import time
from collections.abc import Callable

import torch

from lmforge.chat import ChatTemplate
from lmforge.generate import generate
from lmforge.hardware import cpu_name
from lmforge.loading import load_lm
from lmforge.speculative import SpeculativeStats, generate_speculative

CODE_SOURCES = [("textwrap", "TextWrapper._split"), ("json.encoder", "JSONEncoder.encode"),
                ("calendar", "Calendar.itermonthdays2"), ("shlex", "quote"), ("string", "capwords"),
                ("fnmatch", "translate")]
"""(module, function) whose opening lines (signature, docstring, first statements) make the code prompts."""

CHAT_QUESTIONS = [
    "Explain what this function does, then rewrite it with clearer names:\n\n",
    "Find the bug in this code and show the fixed version:\n\n",
    "Add type hints to this function and repeat it in full:\n\n",
    "Summarize this code in two sentences, quoting the line that matters most:\n\n",
]
"""User turns of the chat prompts, each followed by a piece of standard-library code."""


def code_prompts(tokenizer, n_tokens: int) -> list[list[int]]:
    """The first ~``n_tokens`` tokens of each CODE_SOURCES function, cut at a line end."""
    out = []
    for module, name in CODE_SOURCES:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        lines, text = inspect.getsource(obj).splitlines(keepends=True), ""
        for line in lines:
            if len(tokenizer.encode(text + line)) > n_tokens:
                break
            text += line
        out.append(tokenizer.encode(text))
    return out


def chat_prompts(template: ChatTemplate, tokenizer, n_tokens: int) -> list[list[int]]:
    """A user turn per CHAT_QUESTIONS quoting a piece of code, rendered for the assistant's reply."""
    out = []
    for question, code in zip(CHAT_QUESTIONS, code_prompts(tokenizer, n_tokens // 2), strict=False):
        text = template.render([{"role": "user", "content": question + tokenizer.decode(code)}],
                               add_generation_prompt=True)
        out.append(tokenizer.encode(text, allow_special=True))
    return out


def timed(fn: Callable[..., list[int]], *args) -> tuple[list[int], float]:
    """fn(*args) and its wall time."""
    began = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the target run (e.g. `lmforge train`'s default one)")
    ap.add_argument("--draft", help="a small run trained on the same dataset (the same tokenizer)")
    ap.add_argument("--lookup", type=int, default=3, help="prompt lookup's n-gram size")
    ap.add_argument("--draft-tokens", default="4", help="k: tokens proposed per step; a comma list to compare")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=110, help="about how long a code prompt is")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16 casts the weights (no autocast)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch; 0 leaves its default")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    run = load_lm(args.run, "cpu", "bench/speculative.py")
    model = run.model.to(dtype).eval()
    draft = None
    if args.draft:
        found = load_lm(args.draft, "cpu", "bench/speculative.py --draft")
        assert found.tokenizer.hf.get_vocab() == run.tokenizer.hf.get_vocab(), "the draft needs the same tokenizer"
        draft = found.model.to(dtype).eval()
    tok = run.tokenizer
    template = ChatTemplate.resolve(None, run.folder, tok)
    workloads = {"code": (code_prompts(tok, args.prompt_tokens), [tok.eot_id]),
                 "chat": (chat_prompts(template, tok, args.prompt_tokens), [tok.eot_id, *template.stop_ids])}
    ks = [int(k) for k in args.draft_tokens.split(",")]
    methods: dict[str, Callable[[list[int], list[int], SpeculativeStats], list[int]]] = {
        "plain": lambda p, stop, _: generate(model, [p], args.new_tokens, temperature=0, stop_ids=stop)[0]}

    def speculative(**kw):
        def run_one(p: list[int], stop: list[int], total: SpeculativeStats) -> list[int]:
            out, stats = generate_speculative(model, p, args.new_tokens, stop_ids=stop, **kw)
            total.add(stats)
            return out
        return run_one

    for k in ks:
        methods[f"lookup {args.lookup}, k={k}"] = speculative(lookup_ngram=args.lookup, num_draft_tokens=k)
        if draft is not None:
            methods[f"draft, k={k}"] = speculative(draft=draft, num_draft_tokens=k)

    results = {}
    for kind, (prompts, stop) in workloads.items():
        times: dict[str, list[float]] = {m: [] for m in methods}
        counts: dict[str, list[int]] = {m: [] for m in methods}
        stats = {m: SpeculativeStats() for m in methods}
        mismatches = {m: 0 for m in methods}
        names = list(methods)
        for rep in range(args.reps + 1):  # round 0 warms up
            for i, p in enumerate(prompts):
                order = names[(rep + i) % len(names):] + names[:(rep + i) % len(names)]
                outs = {}
                for m in order:
                    counted = SpeculativeStats()
                    out, seconds = timed(methods[m], p, stop, counted)
                    outs[m] = out
                    if rep:
                        times[m].append(seconds)
                        counts[m].append(len(out))
                        stats[m].add(counted)
                if rep:
                    for m, out in outs.items():
                        mismatches[m] += out != outs["plain"]
        row = {}
        for m in names:
            # Per repetition: the kind's new tokens over its wall time (all prompts), then median and range.
            n = len(prompts)
            per_rep = [sum(counts[m][r * n:(r + 1) * n]) / sum(times[m][r * n:(r + 1) * n]) for r in range(args.reps)]
            s = stats[m]
            row[m] = {"tok_s_median": statistics.median(per_rep), "tok_s_min": min(per_rep),
                      "tok_s_max": max(per_rep), "new_tokens": sum(counts[m]) // args.reps,
                      "tokens_per_step": (s.tokens - len(counts[m])) / s.steps if s.steps else None,
                      "accepted": s.accepted, "proposed": s.proposed, "outputs_differing_from_plain": mismatches[m]}
        base = row["plain"]["tok_s_median"]
        print(f"\n{kind}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"up to {args.new_tokens} new tokens each, {args.reps} reps")
        print(f"  {'method':<18} {'tok/s median (min-max)':>26} {'speed-up':>9} {'tokens/step':>12} "
              f"{'kept':>7} {'differ':>7}")
        for m, r in row.items():
            kept = f"{r['accepted'] / r['proposed']:.0%}" if r["proposed"] else "-"
            per_step = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] else "1.00"
            print(f"  {m:<18} {r['tok_s_median']:>10.1f} ({r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}) "
                  f"{r['tok_s_median'] / base:>8.2f}x {per_step:>12} {kept:>7} {r['outputs_differing_from_plain']:>7}")
        results[kind] = row
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "precision": args.precision, "run": args.run, "draft": args.draft,
            "target_params": sum(p.numel() for p in model.parameters()),
            "draft_params": sum(p.numel() for p in draft.parameters()) if draft is not None else None,
            "new_tokens": args.new_tokens, "reps": args.reps, "results": results}
    print(f"\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {args.precision}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
