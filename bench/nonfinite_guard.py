"""The NaN/Inf guard's cost on the default model: guard on vs off, step by step in one process.

    python bench/nonfinite_guard.py [--steps 20] [--grad-clip 1.0] [--device cpu|cuda]

The default model (gpt2-mini shape, vocabulary 4096, batch 16 x 256, as `lmforge train` runs it).
Steps alternate: one with the optimizer step through ``lmforge.training.guard.NonfiniteGuard`` (the
loss and gradient norm tested on the device, fused AdamW told by ``found_inf``), one with a plain
optimizer step. Reported: the median of each, their ratio, and the median time of the guard's own
work (its step minus the optimizer's; with grad_clip 0 it also computes the gradient norm).
Acceptance (issue 12): at most 2% of a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.config import ModelConfig, OptimConfig, from_dict
from lmforge.model.gpt import GPT
from lmforge.runtime import keep_freed_memory
from lmforge.training.guard import NonfiniteGuard
from lmforge.training.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="the default config clips at 1.0")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    keep_freed_memory()  # as `lmforge train` does
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": "gpt2-mini", "vocab_size": 4096, "block_size": 256})
    model = GPT(cfg).to(device).train()
    opt = build_optimizer(model, OptimConfig(), device)
    guard = NonfiniteGuard(opt, "halt", 0, device)
    params = [p for p in model.parameters() if p.requires_grad]
    times: dict[bool, list[float]] = {True: [], False: []}
    guard_work, plain_step = [], []  # the optimizer step with and without the guard
    for i in range(2 * (args.warmup + args.steps)):
        guarded = i % 2 == 0
        x = torch.randint(0, 4096, (16, 256), device=device)
        sync(device)
        t0 = time.perf_counter()
        loss = model(x, x)[1]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else None
        sync(device)
        g0 = time.perf_counter()
        if guarded:
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            guard.step(i + 1, loss.detach(), norm)
        else:
            opt.step()
        sync(device)
        g1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t1 = time.perf_counter()
        if i >= 2 * args.warmup:
            times[guarded].append(t1 - t0)
            (guard_work if guarded else plain_step).append(g1 - g0)
        if i % 10 == 9:
            assert guard.settle() == []
    on, off = statistics.median(times[True]), statistics.median(times[False])
    work = statistics.median(guard_work) - statistics.median(plain_step)
    print(f"{device} grad_clip {args.grad_clip} | step guard on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms, "
          f"ratio {on / off:.4f} | guard's own work {work * 1e3:.3f} ms = {work / off:.3%} of a step "
          f"(medians of {args.steps} steps each)")


if __name__ == "__main__":
    main()
