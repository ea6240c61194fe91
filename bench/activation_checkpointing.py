"""Activation checkpointing: peak memory against step time, per mode (``train.activation_checkpointing``).

    python bench/activation_checkpointing.py [--preset gpt2-124m] [--batch 4] [--context 1024] [--reps 5]
                                             [--precision auto|bf16|fp32] [--json out.json]

One model, one fused AdamW, the same random batches. Memory: one training step per mode under PyTorch's
``MemTracker`` (``torch.distributed._tools.mem_tracker``), which counts every tensor's bytes as it is made and freed,
by kind (parameters, gradients, optimizer state, activations, temporaries): exact and the same on every run, where
a process's resident size would also count the allocator's caching. It gives the step's peak (everything) and
the activations the forward leaves for the backward (what checkpointing trades for recomputation). Time: the modes
alternate step by step (median and spread of ``--reps`` steps after warm-up), so that load from elsewhere hits all
of them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from lmforge.config import ModelConfig, OptimConfig, from_dict
from lmforge.hardware import cpu_name
from lmforge.model.gpt import GPT
from lmforge.runtime import Runtime, keep_freed_memory, resolve_precision
from lmforge.training.optim import build_optimizer

MODES = {"off": False, "selective": "selective", "full": True}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as `lmforge train` runs
    precision = resolve_precision(args.precision, device)
    dtype = Runtime(device, precision).autocast_dtype
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    cfg = from_dict(ModelConfig, {"preset": args.preset, "vocab_size": args.vocab, "block_size": args.context,
                                  "dropout": 0.0})
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), device, precision)
    data = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    print(f"{where} | {device} | {precision} | torch {torch.__version__} | {args.preset} "
          f"({model.num_params() / 1e6:.0f}M) | batch {args.batch} x {args.context}", flush=True)

    def step(after_forward: Callable[[], None] = lambda: None) -> None:
        """As the training loop's: forward under autocast, backward, optimizer."""
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, y)
        after_forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # the optimizer's state exists from here on, as in every step of a run but the first
    memory = {}
    for name, mode in MODES.items():
        model.activation_checkpointing = mode
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        held: dict = {}
        with tracker:  # what the forward left for the backward, then the whole step's peak
            step(lambda held=held, tracker=tracker: held.update(tracker.get_tracker_snapshot()[device]))
        peak = tracker.get_tracker_snapshot("peak")[device]
        memory[name] = {"peak_total": peak["Total"], "held_after_forward": held["Total"],
                        "activations_after_forward": next(b for kind, b in held.items() if str(kind).endswith("ACT"))}
        print(f"  {name}: peak {memory[name]['peak_total'] / 2**20:.0f} MiB, activations held for the backward "
              f"{memory[name]['activations_after_forward'] / 2**20:.0f} MiB", flush=True)

    times: dict[str, list[float]] = {name: [] for name in MODES}
    for i in range(args.warmup + args.reps):
        for name, mode in MODES.items():
            model.activation_checkpointing = mode
            t = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    rows = []
    base = statistics.median(times["off"])
    for name in MODES:
        med = statistics.median(times[name])
        rows.append({"mode": name, "peak_MiB": memory[name]["peak_total"] / 2**20,
                     "activations_MiB": memory[name]["activations_after_forward"] / 2**20, "step_s": med,
                     "step_s_min": min(times[name]), "step_s_max": max(times[name]),
                     "step_vs_off": med / base, "tokens_per_s": args.batch * args.context / med,
                     "memory": memory[name]})
    print("| train.activation_checkpointing | peak memory (MiB) | activations held for the backward (MiB) | "
          "step (s, median [min-max]) | step vs off |")
    print("|---|---:|---:|---:|---:|")
    for r, value in zip(rows, MODES.values(), strict=True):
        print(f"| `{str(value).lower()}` | {r['peak_MiB']:.0f} | {r['activations_MiB']:.0f} | {r['step_s']:.2f} "
              f"[{r['step_s_min']:.2f}-{r['step_s_max']:.2f}] | {r['step_vs_off']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "precision": precision, "torch": torch.__version__, "preset": args.preset,
                       "batch": args.batch, "context": args.context, "reps": args.reps,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
