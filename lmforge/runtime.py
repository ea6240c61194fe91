"""Where and how the computation runs: device, rank, precision (autocast), compile, eval mode.

Everything that depends on the hardware or on the process group is decided here, once, so the
training loop stays the same on a laptop CPU, one GPU, or (later) many under torchrun.

Nothing here changes process-wide state as a side effect of building a model or calling
``lmforge.training()``. The two process-wide settings the ``lmforge`` command makes are explicit calls
(:func:`keep_freed_memory`, :func:`compile_falls_back_to_eager`); a notebook may make them too.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.hardware import bf16_gemm_speedup
from lmforge.malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt


@dataclass(frozen=True)
class Placement:
    """Where this process computes: its device, and its rank among ``world_size`` processes (torchrun's)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Runtime:
    """A placement and the precision computed in there (see :func:`setup_runtime`)."""

    device: torch.device
    precision: str  # "bf16" | "fp16" | "fp32"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def placement(self) -> Placement:
        return Placement(self.device, self.rank, self.world_size)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling to keep small gradients from underflowing; bf16/fp32 do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


BF16_MIN_SPEEDUP = 1.2
"""bf16 is chosen on a CPU only where it measured at least this much faster than fp32."""


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep large freed blocks in the process (Linux only; returns whether it did).

    Process-wide: ``lmforge train`` and ``lmforge finetune`` call it; the Python API does not.

    A training step allocates and frees the same large tensors (logits, activations) every step.
    By default glibc serves blocks above its mmap threshold (adaptive, at most 32 MB) with fresh
    pages and unmaps them on free, so every step page-faults and zeroes them again, and a shrinking
    heap is trimmed back to the OS. Measured on 2 cores, bf16: the 1.3M model's step 234 -> 160 ms,
    the 12M model's 708 -> 568 ms (eager). The cost: the process keeps its peak heap.
    """
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: unknown device '{name}' (expected auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name}, but no CUDA device is available (use auto or cpu)")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("train.precision=bf16, but this GPU does not support bf16 (use fp16 or auto)")
        if name == "fp16" and device.type == "cpu":
            # CPUs have no fast fp16 matmuls, and fp16 training needs loss scaling made for GPUs.
            raise UserError("precision fp16 is for GPUs; on a CPU use bf16, fp32 or auto")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        # Inference commands decide by the GEMMs; training refines this with its own model's step
        # (lmforge.training.precision).
        return "bf16" if bf16_gemm_speedup(device) >= BF16_MIN_SPEEDUP else "fp32"
    return "fp32"


def place(device: str = "auto", threads: int = 0) -> Placement:
    """This process's device (``threads`` CPU threads if > 0), rank and world size (torchrun's environment, if
    present)."""
    if threads > 0:
        torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        # TF32 matmuls for any fp32 work left outside autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Placement(dev, rank, world_size)


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int = 0) -> Runtime:
    """Pick the device and precision (for inference: 'auto' by the GEMMs; training measures its own model's step,
    :mod:`lmforge.training.precision`); rank/world size come from torchrun's environment if present."""
    where = place(device, threads)
    return Runtime(where.device, resolve_precision(precision, where.device), where.rank, where.world_size)


def compile_falls_back_to_eager() -> None:
    """Make a model that torch.compile cannot compile (no C compiler, an unsupported platform) run
    eagerly with a warning instead of raising at its first call.

    Process-wide (dynamo's ``suppress_errors``): the ``lmforge`` command sets it; the Python API
    leaves dynamo's default (raise), so a notebook sees the real error unless it calls this.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True


def maybe_compile(model: torch.nn.Module, enabled: bool, dynamic: bool | None = None) -> torch.nn.Module:
    """torch.compile the model if asked, else return it as is.

    dynamic=True compiles one graph for all sequence lengths (generation: a prefill of any prompt
    length, then a KV cache that grows every step) instead of recompiling as shapes change.
    Compilation happens lazily at the first call; see :func:`compile_falls_back_to_eager`.
    """
    if not enabled:
        return model
    import torch._dynamo

    # Every compiled model instance adds its own graphs to the same forward's cache (two per decoding model: the
    # prefill and the one-token step, more for a server's batch sizes): past dynamo's default limit of 8 entries a
    # process that compiles several models (a benchmark, a probe then the model) would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    try:
        return torch.compile(model, dynamic=dynamic)
    except Exception as e:  # noqa: BLE001 - any failure to set up compile means: run eagerly
        warnings.warn(f"torch.compile unavailable ({e}); running eagerly", stacklevel=2)
        return model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
