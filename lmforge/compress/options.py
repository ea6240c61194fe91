"""The options of ``lmforge quantize``, ``prune``, ``export`` (no PyTorch here: the command line is made from them
before any model code loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.options import DeviceOptions, check, option


@dataclass(kw_only=True)
class ReportOptions(DeviceOptions):
    """What the report of a compression measures: perplexity on some windows, and decode speed."""

    data: list[str] = option([], nargs="+", metavar="SRC")
    """Text files/folders to measure perplexity on (default: the run's val split)."""
    windows: int = 64
    """Context-length windows the perplexity is measured on."""
    no_speed: bool = False
    """Skip the decode-speed measurement."""

    def __post_init__(self) -> None:
        check(self.windows >= 1, "windows", "an integer of at least 1", self.windows)

    @property
    def report_device(self) -> str:
        """'auto' is the CPU here: PyTorch's integer kernels (int8, int4) are CPU kernels."""
        return "cpu" if self.device == "auto" else self.device


@dataclass
class QuantizeOptions(ReportOptions):
    """Store a run's Linear weights as int8 or int4, with a report of the cost.

    Weight-only quantization of every Linear of the blocks (int8: per output channel; int4: scale and zero per
    group of inputs) into a new run directory that generate, eval, serve and export load; prints and writes bytes,
    perplexity and decode speed before and after.
    """

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    method: Literal["int8", "int4"]
    """Integer width."""
    out: str
    """Run directory to create."""
    group_size: int = 32
    """int4: inputs per scale/zero group, 32/64/128/256."""
    include_embeddings: bool = False
    """Quantize the token embedding and output head too (default: kept in bf16)."""


@dataclass
class PruneOptions(ReportOptions):
    """Zero or remove weights of a run (magnitude, Wanda, MLP neurons), then recover.

    Unstructured pruning by |W| (magnitude) or |W|*||X|| per output row (Wanda), or structured removal of MLP
    neurons (a smaller model), into a new run directory; --recover-steps N trains it N steps with the sparsity held
    fixed (resumable with lmforge train --resume OUT). Prints and writes a report.
    """

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    method: Literal["magnitude", "wanda", "structured"]
    """What to remove."""
    out: str
    """Run directory to create."""
    sparsity: float = 0.5
    """magnitude/wanda: fraction of each layer's weights set to zero."""
    ratio: float = 0.25
    """structured: fraction of each block's MLP neurons removed."""
    calibration: list[str] = option([], nargs="+", metavar="SRC")
    """wanda/structured: text files to calibrate on (default: the run's train split)."""
    calibration_windows: int = 128
    """Calibration windows of the model's context."""
    recover_steps: int = 0
    """Train the pruned model this many steps on the source's dataset (0: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.calibration_windows >= 1, "calibration_windows", "an integer of at least 1",
              self.calibration_windows)


@dataclass
class ExportOptions:
    """Write a run as a folder transformers loads, or a GGUF file for llama.cpp."""

    run: str = option(positional=True)
    """Run directory, checkpoint directory or Hugging Face folder."""
    out: str
    """Folder (hf) or file (gguf) to create."""
    format: Literal["hf", "gguf"] = "hf"
    """hf: a save_pretrained folder; gguf: one file for llama.cpp, Ollama, LM Studio."""
    type: Literal["f16", "q8_0", "q4_0"] = "f16"
    """gguf: the matrices' storage type."""
