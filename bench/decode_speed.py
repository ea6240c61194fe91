"""Batch-1 decode: lmforge against llama.cpp on the same weights and threads, side by side.

    python bench/decode_speed.py RUN [RUN ...] [--prompt-tokens 64] [--new-tokens 128] [--rounds 5] [--threads 2]
        [--contenders NAME,...] [--json bench/results/decode_speed.json] [--markdown FILE]

For each run (a float run directory): lmforge as ``lmforge generate --compile`` runs it
(:func:`lmforge.inference.decode_setup`: its weights in the precision measured fastest at compiled decoding; then
``torch.compile(dynamic=True)``), and as plain ``lmforge generate`` (eager); the run quantized by ``lmforge
quantize`` (int8, int4 group 32, loaded back from disk as any run is, decoded as ``lmforge generate --compile``
decodes it); and llama.cpp (through
llama-cpp-python) running the run exported by ``lmforge export --format gguf`` as f16, q8_0 and q4_0. Each
greedy-decodes ``--new-tokens`` after the same ``--prompt-tokens``-token prompt on ``--threads`` threads, timed by
:func:`lmforge.compress.llamacpp.lmforge_decode_time` / :func:`~lmforge.compress.llamacpp.llama_decode_time` in two
parts: the prefill (prompt in, first token out) and the decode (every later token). The contenders take turns
(:func:`lmforge.compress.timing.time_alternating`: a warm-up of each, then ``--rounds`` rounds), every figure is the
median with its min-max over the rounds, and each lmforge/llama.cpp ratio is taken within its round (the pairs:
lmforge's float contenders vs f16, int8 vs q8_0, int4 vs q4_0). Prints a markdown table (also ``--markdown``) and
writes ``--json``. Without llama-cpp-python it says so and times lmforge alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.compress import llamacpp
from lmforge.compress.gguf import export_gguf
from lmforge.compress.llamacpp import DecodeTime, llama_decode_time, lmforge_decode_time, open_llama
from lmforge.compress.quantize import quantize_run
from lmforge.compress.timing import ROUNDS, Spread, format_ratio, format_spread, ratio_per_round, time_alternating
from lmforge.hardware import cpu_name
from lmforge.inference import decode_setup
from lmforge.loading import LoadedRun, load_run
from lmforge.model.quantized import QuantSpec
from lmforge.runtime import Runtime, maybe_compile, setup_runtime

PROMPT_TEXT = " ".join(llamacpp.TEXTS)
"""Where the prompt's tokens come from (code, prose, whitespace, unicode), repeated if the tokenizer needs more."""


@dataclass
class Contender:
    """One way of decoding a run: a name, and the GGUF type or lmforge float contender it is compared with."""

    name: str
    engine: str
    """'lmforge' or 'llama.cpp'."""
    decode: Callable[[], DecodeTime]
    pair: str | None = None
    """The llama.cpp contender an lmforge one is set against."""
    close: Callable[[], None] | None = None
    """Frees what it holds (a llama.cpp model)."""
    times: list[DecodeTime] = field(default_factory=list)

    def run(self) -> None:
        self.times.append(self.decode())


@dataclass
class Row:
    """One contender's figures over the rounds."""

    name: str
    engine: str
    prefill_tokens_per_s: Spread
    decode_tokens_per_s: Spread
    pair: str | None
    decode_vs_pair: Spread | None
    """lmforge's decode tokens/s over its llama.cpp pair's, round by round."""
    same_tokens_as_pair: bool | None
    """Whether both greedy-decoded the same tokens (float formats rounding differently may break a near-tie)."""


def prompt_ids(run: LoadedRun, n: int) -> list[int]:
    """``n`` token ids of :data:`PROMPT_TEXT`."""
    ids = run.tokenizer.encode(PROMPT_TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def quantized(source: str, folder: Path, spec: QuantSpec) -> torch.nn.Module:
    """``lmforge quantize`` of ``source`` into ``folder`` (its report, with no speed or loss worth timing here,
    silenced), loaded back as a run."""
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_run(source, str(folder), spec, windows=1, speed=False)
    return load_run(folder).model


def lmforge_contender(name: str, model: torch.nn.Module, rt: Runtime | None, prompt: list[int], new: int,
                      pair: str | None) -> Contender:
    """lmforge decoding ``model`` under ``rt``'s autocast (as ``lmforge generate`` runs it), or as it is."""

    def decode() -> DecodeTime:
        with rt.autocast() if rt is not None else contextlib.nullcontext():
            return lmforge_decode_time(model, prompt, new)

    return Contender(name, "lmforge", decode, pair)


def contenders_for(run_path: str, run: LoadedRun, prompt: list[int], new: int, threads: int, folder: Path,
                   with_llama: bool) -> list[Contender]:
    """Every contender for one run, in the order they take turns (each lmforge one beside its pair)."""
    rt = setup_runtime("cpu", "auto", threads)
    model = run.model.eval()
    # As `lmforge generate --compile` decodes, and as plain `lmforge generate` does (decode_setup casts in place: a
    # copy each).
    fast, fast_rt, why = decode_setup(copy.deepcopy(model), rt, "auto", compiled=True)
    out = [lmforge_contender(f"lmforge --compile ({why.split(' (')[0]})", maybe_compile(fast, True, dynamic=True),
                             fast_rt, prompt, new, "llama.cpp f16")]
    eager, eager_rt, why = decode_setup(copy.deepcopy(model), rt, "auto")
    out.append(lmforge_contender(f"lmforge eager ({why.split(' (')[0]})", eager, eager_rt, prompt, new,
                                 "llama.cpp f16"))
    for method, qtype in (("int8", "q8_0"), ("int4", "q4_0")):
        q, q_rt, _ = decode_setup(quantized(run_path, folder / method, QuantSpec(method, 32, False)), rt, "auto",
                                  compiled=True)
        out.append(lmforge_contender(f"lmforge {method} --compile ({q_rt.precision})",
                                     maybe_compile(q, True, dynamic=True), q_rt, prompt, new, f"llama.cpp {qtype}"))
    if with_llama:
        for qtype in ("f16", "q8_0", "q4_0"):
            path = export_gguf(model, run.tokenizer, folder / f"{qtype}.gguf", qtype, name=Path(run_path).name)
            llm = open_llama(path, len(prompt) + new, threads)
            out.append(Contender(f"llama.cpp {qtype}", "llama.cpp",
                                 lambda llm=llm: llama_decode_time(llm, prompt, new), close=llm.close))
    return out


def bench_run(run_path: str, args: argparse.Namespace, with_llama: bool) -> dict:
    """Time every contender for one run in alternation; its rows and a description of its model."""
    run = load_run(run_path)
    cfg = run.model.cfg
    if args.prompt_tokens + args.new_tokens > cfg.block_size:
        raise SystemExit(f"{run_path}: a {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens pass the "
                         f"model's context of {cfg.block_size} tokens (lower --prompt-tokens or --new-tokens)")
    prompt = prompt_ids(run, args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="decode_speed-") as tmp:
        contenders = contenders_for(run_path, run, prompt, args.new_tokens, args.threads, Path(tmp), with_llama)
        if args.contenders:
            wanted = set(args.contenders.split(","))
            contenders = [c for c in contenders if c.name.split(" (")[0] in wanted]
        try:
            time_alternating([c.run for c in contenders], args.rounds)
        finally:
            for c in contenders:
                if c.close is not None:
                    c.close()
    by_name = {c.name: c for c in contenders}
    rows = []
    for c in contenders:
        timed = c.times[1:]  # the first call was the warm-up
        decode = [t.decode_tokens_per_s for t in timed]
        pair = by_name.get(c.pair) if c.pair else None
        theirs = [t.decode_tokens_per_s for t in pair.times[1:]] if pair else None
        rows.append(Row(c.name, c.engine, Spread.of([t.prefill_tokens_per_s for t in timed]), Spread.of(decode),
                        pair.name if pair else None, ratio_per_round(decode, theirs) if theirs else None,
                        timed[-1].tokens == pair.times[-1].tokens if pair else None))
    shape = (f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head or cfg.n_head} kv), width {cfg.n_embd}, "
             f"vocab {cfg.vocab_size}")
    return {"run": run_path, "params": run.model.num_params(), "shape": shape, "rows": rows}


def markdown(results: list[dict], header: dict) -> str:
    """The summary (lmforge/llama.cpp decode ratio of each pair) and each run's full table."""
    lines = [f"Batch-1 greedy decode, {header['prompt_tokens']}-token prompt + {header['new_tokens']} new tokens, "
             f"{header['threads']} threads, {header['cpu']}; torch {header['torch']}, llama-cpp-python "
             f"{header['llama_cpp'] or 'not installed'}. The contenders took turns (a warm-up of each, then "
             f"{header['rounds']} rounds): median (min-max) over the rounds; each ratio is lmforge's decode tokens/s "
             f"over llama.cpp's in the same round. Decode: the tokens after the first; prefill: the prompt in, the "
             f"first token out.", ""]
    paired = [(r, row) for r in results for row in r["rows"] if row.decode_vs_pair is not None]
    if paired:
        lines += ["| run | lmforge | tok/s | llama.cpp | tok/s | lmforge / llama.cpp |", "|---|---|--:|---|--:|---|"]
        for r, row in paired:
            theirs = next(x for x in r["rows"] if x.name == row.pair)
            lines.append(f"| {Path(r['run']).name} ({r['params'] / 1e6:.1f}M) | {row.name} | "
                         f"{row.decode_tokens_per_s.median:,.0f} | {theirs.name} | "
                         f"{theirs.decode_tokens_per_s.median:,.0f} | {format_ratio(row.decode_vs_pair)} |")
        lines.append("")
    for r in results:
        lines += [f"**{r['run']}** ({r['params'] / 1e6:.1f}M params: {r['shape']})", "",
                  "| contender | prefill tok/s | decode tok/s | decode vs llama.cpp | same tokens |",
                  "|---|--:|--:|---|---|"]
        for row in r["rows"]:
            ratio = f"{format_ratio(row.decode_vs_pair)} vs {row.pair.removeprefix('llama.cpp ')}" \
                if row.decode_vs_pair is not None else ""
            same = "" if row.same_tokens_as_pair is None else ("yes" if row.same_tokens_as_pair else "no")
            lines.append(f"| {row.name} | {format_spread(row.prefill_tokens_per_s, 0)} | "
                         f"{format_spread(row.decode_tokens_per_s, 0)} | {ratio} | {same} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="float run directories")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds after the warm-up")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch and llama.cpp alike")
    ap.add_argument("--contenders", help="time only these (comma-separated names without their parenthesis, e.g. "
                                         "'lmforge bf16 weights,llama.cpp f16')")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--markdown", help="write the table here too")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--new-tokens must be at least 2 (decode speed is the tokens after the first); --prompt-tokens, "
                 "--rounds and --threads at least 1")

    torch.set_num_threads(args.threads)
    with_llama = llamacpp.available()
    if not with_llama:
        print("llama-cpp-python is not installed (pip install 'lmforge[llamacpp]'): timing lmforge alone",
              file=sys.stderr)
    header = {"cpu": cpu_name(), "machine": platform.machine(), "threads": args.threads, "torch": torch.__version__,
              "llama_cpp": importlib.metadata.version("llama-cpp-python") if with_llama else None,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds}
    results = []
    for run in args.runs:
        print(f"timing {run} ...", file=sys.stderr, flush=True)
        results.append(bench_run(run, args, with_llama))
        # The files hold every run timed so far: a long bench stopped midway keeps what it measured.
        table = markdown(results, header)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n", encoding="utf-8")
        if args.json:
            out = {**header, "runs": [{**r, "rows": [asdict(row) for row in r["rows"]]} for r in results]}
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
