"""What a run reports: the live progress line, metrics.jsonl, TensorBoard events, the loss-curve PNG,
and the arithmetic behind them as pure functions: perplexity, bits per byte, tokens/s, MFU (model
FLOPs utilisation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from lmforge.rundir import METRICS, write_text_atomic


def perplexity(loss_nats: float) -> float:
    """exp(loss), capped at exp(50) so that a diverged run's figure stays a number."""
    return math.exp(min(loss_nats, 50))


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Cross-entropy in nats/token -> bits per UTF-8 byte, comparable across tokenizers."""
    return loss_nats / math.log(2) * tokens / max(1, n_bytes)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Fraction of the device's peak spent on the model's FLOPs (the PaLM definition)."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0


def eta_seconds(elapsed: float, done: int, remaining: int) -> float:
    """Time left at the average pace so far."""
    return elapsed / max(1, done) * max(0, remaining)


def format_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _flat_scalars(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as ``{"optim.lr": 0.002, ...}``, TensorBoard's hparams types only (None and lists as text)."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank or torn line."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return None


class MetricsLogger:
    """One sink for everything a run records: console, metrics.jsonl, TensorBoard, loss PNG."""

    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int = 0, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS
        self.tb = None
        if not enabled:
            return
        # On resume, drop records past the checkpoint (those steps are about to be replayed) and a line
        # torn by a kill; rewritten atomically, so a second crash here loses no history.
        if start_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if (step := _record_step(line)) is not None and step <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step or None)
        if config is not None and start_step == 0:  # the run's config, once: as text, and as hparams to filter by
            self.tb.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")
            self.tb.add_hparams(_flat_scalars(config), {}, run_name=".")

    def log(self, record: dict) -> None:
        """Append one record ({"step": ..., "kind": "train"|"eval", metrics...})."""
        if not self.enabled:
            return
        # Strict JSON: a NaN or infinite value (a diverged loss) is written as null.
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(strict, allow_nan=False) + "\n")
        self.file.flush()
        kind = record.get("kind", "train")
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tb.close()
        plot_loss_curve(self.path, self.run_dir / "loss.png")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step, the learning rate below, as a PNG; a classification run's loss is
    per example, and its val accuracy is drawn on a second axis. Nothing logged yet (a run stopped before its
    first log line): no PNG is written, as an empty chart would look like a broken plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    lrs = [(r["step"], r["lr"]) for r in records if r.get("kind") == "train" and r.get("lr") is not None]
    if not (train or val or lrs):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), dpi=100, sharex=True, height_ratios=(3, 1))
    if train:
        ax.plot(*zip(*train, strict=False), label="train", linewidth=1)
        first_step, first_loss = train[0]  # where the curve starts: a log interval in, not at step 0
        ax.annotate(f"step {first_step}: {first_loss:.3f}", (first_step, first_loss), textcoords="offset points",
                    xytext=(8, -4), fontsize=8)
        ax.plot([first_step], [first_loss], "o", color="C0", markersize=4)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="val", markersize=3)
    accuracy = [(r["step"], r["val_accuracy"]) for r in records
                if r.get("kind") == "eval" and r.get("val_accuracy") is not None]
    ax.set_ylabel("loss (nats/example)" if accuracy else "loss (nats/token)")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    if train or val:  # a run that halted before its first log has no curve to label
        ax.legend(loc="upper left" if accuracy else "best")
    if accuracy:  # classification: what the loss is for
        ax_acc = ax.twinx()
        ax_acc.plot(*zip(*accuracy, strict=False), "s--", color="C3", markersize=3, label="val accuracy")
        ax_acc.set_ylabel("val accuracy")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(loc="upper right")
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=False), color="C2", linewidth=1)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("lr")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
