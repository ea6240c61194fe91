"""What a compression costs and gains, measured the same way for every method: bytes of the block Linear
weights and of the whole checkpoint, perplexity on the same windows, decode speed on the same prompts (the models
timed in alternation, :mod:`lmforge.compress.timing`: medians with their spread, ratios taken round by round).

The windows come from the source run's validation split (the evenly spaced windows training evaluates on),
or from text files given as ``--data`` (one window after another). The same windows calibrate Wanda's
pruning (:mod:`lmforge.compress.prune`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import torch

from lmforge import rundir
from lmforge.compress import llamacpp
from lmforge.compress.gguf import read_gguf
from lmforge.compress.output import source_weights
from lmforge.compress.timing import ROUNDS, Spread, format_ratio, format_spread, ratio_per_round, time_alternating
from lmforge.config import TrainConfig
from lmforge.data.loader import eval_offsets, open_split
from lmforge.data.prepare import load_meta
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.generate import generate
from lmforge.hardware import cpu_name
from lmforge.loading import LoadedRun
from lmforge.model.gpt import GPT
from lmforge.model.quantized import QuantLinear, block_linears
from lmforge.runtime import Runtime, eval_mode, setup_runtime

REPORT = "compression_report.json"
DECODE_BATCHES = (1, 8)
PROMPT_TOKENS = 16
NEW_TOKENS = 32


@dataclass
class Windows:
    """Token windows (n, block_size + 1) to score or calibrate on, and where they came from."""

    tokens: torch.Tensor
    source: str

    def batches(self, batch_size: int):
        for i in range(0, len(self.tokens), batch_size):
            chunk = self.tokens[i:i + batch_size]
            yield chunk[:, :-1], chunk[:, 1:]


def eval_windows(run: LoadedRun, n: int, data: list[str] | None = None, split: str = "val") -> Windows | None:
    """``n`` windows of the model's context: from ``data`` (text files) if given, else evenly spaced over the
    run's dataset split; None when there is neither (an imported model without ``--data``)."""
    block, vocab = run.model.cfg.block_size, run.model.cfg.vocab_size
    if data:
        ids: list[int] = []
        for doc in iter_documents(data):
            ids += run.tokenizer.encode(doc.text) + [run.tokenizer.eot_id]
            if len(ids) >= n * (block + 1):
                break
        if len(ids) < block + 1:
            raise UserError(f"--data {' '.join(data)}: {len(ids)} tokens, fewer than one window of "
                            f"{block} + 1 (the model's context)")
        rows = min(n, len(ids) // (block + 1))
        return Windows(torch.tensor(ids[:rows * (block + 1)]).view(rows, block + 1), " ".join(data))
    dataset = getattr(getattr(run.config, "data", None), "dataset_dir", None)
    if not isinstance(run.config, TrainConfig) or not dataset or not (Path(dataset) / "meta.json").is_file():
        return None
    meta = load_meta(Path(dataset))
    shard = open_split(meta, split, block, vocab)
    offsets = eval_offsets(len(shard), block, n, 1)
    x, y = shard.windows(offsets)
    return Windows(torch.cat([x, y[:, -1:]], dim=1), f"{dataset} ({split} split)")


@torch.no_grad()
def windows_loss(model: GPT, windows: Windows, rt: Runtime, batch_size: int = 8) -> float:
    """Mean next-token loss over the windows."""
    total = 0.0
    with eval_mode(model):
        for x, y in windows.batches(batch_size):
            with rt.autocast():
                _, loss = model(x.to(rt.device), y.to(rt.device))
            total += loss.float().item() * len(x)
    return total / len(windows.tokens)


def decode_prompts(windows: Windows | None, tokenizer: Tokenizer, n: int) -> list[list[int]]:
    """``n`` prompts of PROMPT_TOKENS tokens: the first tokens of windows, or fixed text without windows."""
    if windows is not None and len(windows.tokens) >= n:
        return [row[:PROMPT_TOKENS].tolist() for row in windows.tokens[:n]]
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:PROMPT_TOKENS] or [tokenizer.eot_id]
    return [ids] * n


def linear_bytes(model: GPT) -> tuple[int, int]:
    """(bytes of the block Linear weights as stored, their parameter count). Float weights count at their
    dtype; quantized ones their integers plus scales and zeros."""
    stored = params = 0
    for _, parent, attr in block_linears(model):
        m = getattr(parent, attr)
        if isinstance(m, QuantLinear):
            stored += sum(t.numel() * t.element_size() for name, t in m.named_buffers())
            params += m.in_features * m.out_features
        else:
            stored += m.weight.numel() * m.weight.element_size()
            params += m.weight.numel()
    return stored, params


def zero_fraction(model: GPT) -> float | None:
    """The fraction of the block Linear weights that are exactly zero (what unstructured pruning sets); None for a
    quantized model (its integers are not its weights)."""
    zeros = total = 0
    for _, parent, attr in block_linears(model):
        m = getattr(parent, attr)
        if isinstance(m, QuantLinear):
            return None
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / total if total else None


@dataclass
class Measured:
    """One model's figures."""

    linear_bytes: int
    linear_bf16_bytes: int
    """What the same Linear weights take in bf16 (the baseline the ratios are of)."""
    file_bytes: int | None
    val_loss: float | None
    val_ppl: float | None
    linear_zero_fraction: float | None = None
    """The fraction of the block Linear weights that are zero (None: quantized)."""
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)
    """Batch size -> new tokens per second, the median over the rounds (the spread: ``decode_spread``)."""
    decode_spread: dict[str, Spread] = field(default_factory=dict)
    """Batch size -> new tokens per second: median, min, max and every round's (see :func:`measure_speeds`)."""
    decode_vs_before: dict[str, Spread] = field(default_factory=dict)
    """Batch size -> these tokens per second over the model before compression's, round by round (empty for the
    model before)."""


def measure(model: GPT, windows: Windows | None, rt: Runtime, weights_file: Path | None) -> Measured:
    """A model's bytes and loss (its decode speed: :func:`measure_speeds`, against the other models)."""
    stored, params = linear_bytes(model)
    loss = windows_loss(model, windows, rt) if windows is not None else None
    return Measured(stored, 2 * params, weights_file.stat().st_size if weights_file else None, loss,
                    math.exp(loss) if loss is not None else None, zero_fraction(model))


def _decode(model: GPT, prompts: list[list[int]], rt: Runtime) -> None:
    """Greedy decoding of NEW_TOKENS after each prompt (prefill included): what decode speed times."""
    with rt.autocast():
        generate(model, prompts, NEW_TOKENS, temperature=0.0)


def decode_speed(model: GPT, prompts: list[list[int]], rt: Runtime, reps: int = 3) -> float:
    """One model's new tokens per second of greedy decoding, the median of ``reps`` after a warm-up (for a
    caller that alternates models itself; :func:`measure_speeds` times models against each other)."""
    seconds = time_alternating([lambda: _decode(model, prompts, rt)], reps)[0]
    return len(prompts) * NEW_TOKENS / Spread.of(seconds).median


def measure_speeds(columns: Sequence[tuple[GPT, Measured]], tokenizer: Tokenizer, windows: Windows | None,
                   rt: Runtime, rounds: int = ROUNDS) -> None:
    """Fill each column's decode figures, the models timed in alternation at each batch size of DECODE_BATCHES:
    tokens/s as a median with its spread, and every column after the first its ratio to the first, round by
    round (the first column is the baseline: the model before compression)."""
    for batch in DECODE_BATCHES:
        prompts = decode_prompts(windows, tokenizer, batch)
        seconds = time_alternating([lambda m=model, p=prompts: _decode(m, p, rt) for model, _ in columns], rounds)
        speeds = [[batch * NEW_TOKENS / s for s in timings] for timings in seconds]
        for i, ((_, measured), speed) in enumerate(zip(columns, speeds, strict=True)):
            spread = Spread.of(speed)
            measured.decode_tokens_per_s[str(batch)] = spread.median
            measured.decode_spread[str(batch)] = spread
            if i:
                measured.decode_vs_before[str(batch)] = ratio_per_round(speed, speeds[0])


@dataclass
class Report:
    command: str
    source: str
    out: str
    method: dict
    before: Measured
    after: Measured
    windows: str | None
    n_windows: int
    device: str
    recovered: Measured | None = None
    """After ``--recover-steps`` of training (pruning)."""
    notes: list[str] = field(default_factory=list)

    def write(self, folder: Path) -> Path:
        """``folder/compression_report.json``."""
        return self.write_to(folder / REPORT)

    def write_to(self, path: Path) -> Path:
        rundir.write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")
        return path


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f} MiB"


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:.3f}x" if after is not None and before else ""


def format_report(r: Report) -> str:
    """The table every compression command prints: a column per model, and the last one's ratio to the first."""
    columns = [("before", r.before), ("after", r.after)] + ([("recovered", r.recovered)] if r.recovered else [])
    first, last = r.before, columns[-1][1]
    rows = [("", *(name for name, _ in columns), f"{columns[-1][0]}/before")]

    def row(label: str, get, fmt, ratio: str | None = None) -> None:
        values = [get(m) for _, m in columns]
        rows.append((label, *(fmt(v) if v is not None else "n/a" for v in values),
                     _ratio(values[-1], values[0]) if ratio is None else ratio))

    row("Linear weights", lambda m: m.linear_bytes, _mib)
    if r.command == "prune":  # zeros stored dense take the same bytes: the sparsity is the figure
        row("  of them zero", lambda m: m.linear_zero_fraction, lambda v: f"{100 * v:.1f}%", "")
    else:
        rows.append(("  of bf16's", *("" for _ in columns[:-1]), _mib(first.linear_bf16_bytes),
                     _ratio(last.linear_bytes, first.linear_bf16_bytes)))
    row("weights file", lambda m: m.file_bytes, _mib)
    if first.val_ppl is not None:
        row("val perplexity", lambda m: m.val_ppl, lambda v: f"{v:.4f}")
    for batch in first.decode_spread:
        ratio = last.decode_vs_before.get(batch)
        row(f"decode tok/s, batch {batch}", lambda m, b=batch: m.decode_spread.get(b),
            lambda s: format_spread(s, 1), format_ratio(ratio) if ratio is not None else "")
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [f"{x[0]:<{widths[0]}}  " + "  ".join(f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(x[1:]))
             for x in rows]
    where = f"perplexity on {r.n_windows} windows of {r.windows}" if r.windows else \
        "no perplexity: the source has no prepared dataset (give --data FILES)"
    rounds = len(next(iter(first.decode_spread.values())).rounds) if first.decode_spread else 0
    speed = [f"decode: greedy, {PROMPT_TOKENS}-token prompts + {NEW_TOKENS} new tokens; the models timed in "
             f"alternation (a warm-up of each, then {rounds} rounds): median (min-max) over the rounds, each "
             f"ratio taken within its round"] if rounds else []
    return "\n".join(lines + [where, *speed, f"device: {r.device}"] + r.notes)


def describe_device(rt: Runtime) -> str:
    return f"{rt.device} {rt.precision}" + (f" ({cpu_name()}, {torch.get_num_threads()} threads)"
                                            if rt.device.type == "cpu" else "")



GGUF_ROUNDS = 3
"""Timed rounds of the GGUF report's decode figures: few, so that ``lmforge export`` stays quick."""


def llama_cpp_speeds(model: GPT, path: Path, prompt: list[int], before: Measured, after: Measured,
                     rounds: int = GGUF_ROUNDS) -> None:
    """Fill ``before``'s batch-1 decode figure with ``model`` decoding in lmforge (float32, as the report runs it)
    and ``after``'s with llama.cpp decoding the GGUF file at ``path`` on as many threads, in alternation, each
    greedy ``NEW_TOKENS`` after ``prompt`` timed as :func:`lmforge.compress.llamacpp.llama_decode_time` says, its
    tokens/s over the whole call (prefill included, as the other reports count)."""
    llm = llamacpp.open_llama(path, len(prompt) + NEW_TOKENS, torch.get_num_threads())
    ours: list[float] = []
    theirs: list[float] = []

    def in_lmforge() -> None:
        ours.append(llamacpp.lmforge_decode_time(model, prompt, NEW_TOKENS).tokens_per_s)

    def in_llama_cpp() -> None:
        theirs.append(llamacpp.llama_decode_time(llm, prompt, NEW_TOKENS).tokens_per_s)

    try:
        time_alternating([in_lmforge, in_llama_cpp], rounds)
    finally:
        llm.close()
    # Each call's own figure, the warm-up's (the first) left out.
    for measured, speeds in ((before, ours[1:]), (after, theirs[1:])):
        measured.decode_spread["1"] = Spread.of(speeds)
        measured.decode_tokens_per_s["1"] = measured.decode_spread["1"].median
    after.decode_vs_before["1"] = ratio_per_round(theirs[1:], ours[1:])


def gguf_report(run: LoadedRun, model: GPT, path: Path, qtype: str, windows: int = 64) -> Report:
    """What a GGUF export keeps: the file's bytes, and the perplexity of the weights read back from it (run here
    in float32); where llama-cpp-python is installed, how llama.cpp running the file agrees with ``model``
    (:func:`lmforge.compress.llamacpp.agreement`) and how fast it decodes the file at batch 1 against ``model`` in
    lmforge (:func:`llama_cpp_speeds`)."""
    rt = setup_runtime("cpu", "fp32")
    ev = eval_windows(run, windows)
    before = measure(model, ev, rt, source_weights(run))
    _, tensors = read_gguf(path)
    own = model.state_dict()
    back = GPT(model.cfg)
    # A GPT-2 file holds biases even for a bias-free model (zeros): only the model's own tensors are loaded.
    back.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k in own})
    blocks = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
                 if t.name.startswith("blk.") and len(t.shape) == 2)
    after = measure(back.eval(), ev, rt, path)
    after.linear_bytes = blocks
    after_note = "after: the weights read back from the file (gguf.GGUFReader), run by lmforge"
    if llamacpp.available():
        # The prompt cut to leave room for the new tokens in the model's context (llama.cpp's, too).
        prompt = decode_prompts(ev, run.tokenizer, 1)[0][:max(model.cfg.block_size - NEW_TOKENS, 0)]
        if prompt:
            llama_cpp_speeds(model, path, prompt, before, after)
        notes = [f"{after_note}; its decode speed is llama.cpp's running the file (batch 1, the model before in "
                 f"lmforge beside it)", llamacpp.agreement(path, model, run.tokenizer).summary()]
    else:
        notes = [f"{after_note}; decode speed is llama.cpp's", "llama.cpp's own check: pip install 'lmforge[llamacpp]'"]
    return Report(command="export", source=str(run.checkpoint), out=str(path), method={"format": "gguf", "type": qtype},
                  before=before, after=after, windows=ev.source if ev else None,
                  n_windows=len(ev.tokens) if ev else 0, device=describe_device(rt), notes=notes)
