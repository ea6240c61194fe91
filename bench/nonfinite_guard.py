"""The NaN/Inf guard's cost: its per-step check against the time of a whole training step.

    python bench/nonfinite_guard.py [--steps 20] [--grad-clip 1.0]

On the default model (gpt2-mini shape, vocabulary 4096, batch 16 x 256, as `lmforge train` runs it)
each step is timed, and within it the guard (``lmforge.train.steps.nonfinite``: one finiteness test
of loss + gradient norm, one host sync; with grad_clip 0 it also computes the norm). Reported: the
median step, the median guard, and their ratio (acceptance, issue 12: at most 2%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.config import ModelConfig, OptimConfig, from_dict
from lmforge.model.gpt import GPT
from lmforge.runtime import keep_freed_memory
from lmforge.train.optim import build_optimizer
from lmforge.train.steps import nonfinite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="the default config clips at 1.0")
    args = ap.parse_args()
    keep_freed_memory()  # as `lmforge train` does
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": "gpt2-mini", "vocab_size": 4096, "block_size": 256})
    model = GPT(cfg).train()
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    steps, guards = [], []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, 4096, (16, 256))
        t0 = time.perf_counter()
        loss = model(x, x)[1]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else None
        g0 = time.perf_counter()
        problem = nonfinite(loss.detach(), norm, params)
        g1 = time.perf_counter()
        assert problem is None
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        if i >= args.warmup:
            steps.append(t1 - t0)
            guards.append(g1 - g0)
    step, guard = statistics.median(steps), statistics.median(guards)
    print(f"grad_clip {args.grad_clip} | step {step * 1e3:.1f} ms | guard {guard * 1e3:.3f} ms | "
          f"overhead {guard / step:.3%} (median of {args.steps} steps)")


if __name__ == "__main__":
    main()
