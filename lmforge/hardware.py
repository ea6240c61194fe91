"""What this machine computes how fast, measured once and cached: GEMM FLOP/s per dtype (the peak MFU
divides by, and the first answer to "is bf16 fast here?"), and any other timing a caller keys by it.

Decisions are made from measurements, never from CPU flags: CPUs with the same flags differ (AMX
Xeons run bf16 GEMMs ~4-10x faster than fp32, AVX512-BF16 EPYCs ~2.7x, CPUs without bf16 units
~0.01x). The cache (``$LMFORGE_CACHE/hardware.json``) is keyed by :func:`machine_id`: the CPU model,
its flags, the thread count and the PyTorch version (or the GPU's name), because a VM can move to
another host, and a thread count or a PyTorch build changes every figure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.rundir import cache_root

# Dense bf16 peak FLOP/s of known accelerators (vendor figures, no sparsity).
KNOWN_PEAKS: dict[str, float] = {
    "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12,
    "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}

CACHE_FILE = "hardware.json"


@functools.cache
def _cpu_info() -> tuple[str, str]:
    """(model name, flags) of the CPU, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", platform.machine()), fields.get("flags", "")


def machine_id(device: torch.device) -> str:
    """What the cached figures are keyed by: ``AMD EPYC [flags 1a2b3c4d] x2 threads, torch 2.13.0``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    if device.type != "cpu":
        return f"{device.type}, torch {torch.__version__}"
    name, flags = _cpu_info()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:8]
    return f"{name} [flags {digest}] x{torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_name() -> str:
    """The CPU's model name (what lscpu says), for reports."""
    return _cpu_info()[0]


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached(device: torch.device, key: str, measure: Callable[[], object]) -> object:
    """The figure ``key`` of this machine: from the cache, else ``measure()`` (then cached). A cache that
    cannot be written (a read-only home) only costs a measurement next time."""
    path = cache_root() / CACHE_FILE
    machine = machine_id(device)
    known = _load(path)
    figures = known.get(machine)
    if isinstance(figures, dict) and key in figures:
        return figures[key]
    value = measure()
    known = _load(path)  # again: another process may have added figures meanwhile
    known.setdefault(machine, {})[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, reps: int = 8, budget_s: float = 10.0) -> float:
    """FLOP/s of a square GEMM, the best of ``reps`` timings: the practical peak of CPUs and unknown devices.

    The best rather than the mean, so that a moment of contention from another process at start-up
    does not lower the figure that every later MFU is divided by. Half-precision GEMMs need a large
    size to reach their peak (AMX on a Xeon: 0.75 TFLOP/s at 2048², 1.4 at 4096²).
    """
    def seconds_per_gemm(n: int, warmup: int, timed: int) -> float:
        # Its own generator: drawing from the global one would change a run's dropout masks depending on
        # whether the figure was cached already (same config, different losses).
        gen = torch.Generator(device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        for _ in range(warmup):
            a @ b
        best = math.inf
        for _ in range(timed):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    n = 2048 if dtype == torch.float32 and device.type == "cpu" else 4096
    # Where a precision has no fast kernel (bf16 on a CPU without bf16 units runs at ~1 GFLOP/s) the
    # full size would take half an hour: a small GEMM first, and the size halved until the
    # measurement fits in budget_s (a fast kernel keeps the full size: small GEMMs underrate it).
    probe = 512
    rate = 2 * probe**3 / seconds_per_gemm(probe, 1, 1)
    while n > probe and 2 * n**3 / rate * (reps + 3) > budget_s:
        n //= 2
    return 2 * n**3 / seconds_per_gemm(n, 3, reps)


def gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """This machine's measured GEMM FLOP/s in ``dtype`` (cached)."""
    return float(cached(device, f"gemm {dtype}".replace("torch.", ""), lambda: measure_gemm_flops(device, dtype)))


def bf16_gemm_speedup(device: torch.device) -> float:
    """bf16 GEMM FLOP/s over fp32's on this machine (measured, cached)."""
    return gemm_flops(device, torch.bfloat16) / gemm_flops(device, torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where it came from: a known GPU's spec, else the measured GEMM (cached)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value, f"{name} spec"
    if device.type == "cuda":
        label = torch.cuda.get_device_name(device)
    else:
        label = f"{cpu_name()}, {torch.get_num_threads()} threads"
    return gemm_flops(device, dtype), f"measured {dtype} GEMM on {label}".replace("torch.", "")
