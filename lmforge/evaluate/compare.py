"""``lmforge compare``: the final metrics of several runs side by side, and their loss curves in one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import UserError
from lmforge.evaluate.options import CompareOptions
from lmforge.rundir import DATASET_META, METRICS
from lmforge.training.metrics import read_metrics


def _final(records: list[dict]) -> dict:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out: dict = {"steps": train[-1]["step"] if train else 0}
    if train:
        out["train_loss"] = train[-1]["loss"]
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
        out["time_s"] = train[-1].get("time_s")
    done = [r for r in records if r.get("kind") == "done"]
    if done:  # the time the run printed when it finished (final evaluation included)
        out["time_s"] = done[-1]["time_s"]
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k not in ("step", "kind") and isinstance(v, float | int)})
        out["best_val_loss"] = min((r["val_loss"] for r in evals if r.get("val_loss") is not None), default=None)
    return out


def _bits_per_byte_factor(run: str) -> float:
    """What turns the run's train loss (nats per token) into bits per byte: its train split's tokens per
    byte over ln 2. Runs with different tokenizers are comparable on that axis."""
    try:
        train = json.loads((Path(run) / DATASET_META).read_text(encoding="utf-8"))["splits"]["train"]
        return train["tokens"] / train["bytes"] / math.log(2)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        raise UserError(f"'{run}' has no readable {DATASET_META} with token and byte counts: --bpb needs the "
                        f"dataset a pretraining run trained on") from None


SPARSE_POINTS = 30
"""A curve with fewer points than this is drawn with a marker at each: a single point draws no line at all."""


def compare_runs(run_dirs: list[str], png: str | Path, bpb: bool = False) -> tuple[list[tuple[str, dict]], Path]:
    """(run, final metrics) for each run, and the path of the PNG with every run's loss curves (with
    ``bpb``, in bits per byte, so that runs with different tokenizers share one axis)."""
    import matplotlib.pyplot as plt

    runs = []
    for run in run_dirs:
        path = Path(run) / METRICS
        if not path.is_file():
            raise UserError(f"'{run}' has no {METRICS} (expected a run directory)")
        runs.append((run, read_metrics(path)))
        if bpb and any("val_mlm_accuracy" in r for r in runs[-1][1]):
            raise UserError(f"'{run}' is an encoder: its masked-LM loss is no code length of the text, so it has no "
                            f"bits per byte (compare it without --bpb)")
    fig = loss_figure(runs, bpb)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return [(run, _final(records)) for run, records in runs], png


def loss_figure(runs: list[tuple[str, list[dict]]], bpb: bool = False):
    """The Figure of each (run, metrics records)'s train and val loss curves, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [_bits_per_byte_factor(run) if bpb else 1.0 for run, _ in runs]  # refused before a figure is open
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, ((run, records), factor) in enumerate(zip(runs, factors, strict=True)):
        color = f"C{i % 10}"
        val_key = "val_bpb" if bpb else "val_loss"
        train = [(r["step"], r["loss"] * factor) for r in records
                 if r.get("kind") == "train" and r.get("loss") is not None]
        val = [(r["step"], r[val_key]) for r in records if r.get("kind") == "eval" and r.get(val_key) is not None]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, linewidth=1, alpha=0.6, label=f"{Path(run).name} train",
                    marker="." if len(train) < SPARSE_POINTS else None)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color=color, markersize=3, label=f"{Path(run).name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte" if bpb else "loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def format_comparison(rows: list[tuple[str, dict]]) -> str:
    keys = [k for k in ("steps", "train_loss", "val_loss", "best_val_loss", "val_ppl", "val_bpb", "val_mlm_accuracy",
                        "val_accuracy", "val_macro_f1", "exact_match", "tokens_per_s", "time_s")
            if any(k in m for _, m in rows)]
    names = [Path(run).name or run for run, _ in rows]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<14}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for k in keys:
        cells = []
        for _, m in rows:
            v = m.get(k)
            cells.append("-" if v is None else f"{v:,.0f}" if k in ("steps", "tokens_per_s") else f"{v:.4f}")
        lines.append(f"{k:<14}" + "".join(f"{c:>{width + 2}}" for c in cells))
    if any("val_mlm_accuracy" in m for _, m in rows) and any("val_bpb" in m for _, m in rows):
        lines.append("note: an encoder's losses are masked-LM losses (per masked token), not comparable with a "
                     "decoder's next-token losses")
    return "\n".join(lines)


def compare_command(o: CompareOptions) -> None:
    """``lmforge compare``: the table, and where the PNG went."""
    rows, png = compare_runs(o.runs, o.png, bpb=o.bpb)
    print(format_comparison(rows))
    print(f"\nloss curves: {png}")
