"""Training throughput: lmforge vs a plain `transformers` loop, same dimensions, same run.

    python bench/train_speed.py [--sizes tiny,small,124m] [--reps 5] [--json out.json]

For each size both models are built with the same dimensions (GPT-2 style), trained on the same
random token batches with AdamW at the same batch, context and precision, and timed step by step
(median of ``--reps`` timed steps after warm-up). lmforge runs the way `lmforge train` does
(its model, fused AdamW, bf16 autocast where the hardware has it, ``torch.compile`` when
``--compile`` is on); the baseline is ``GPT2LMHeadModel`` with SDPA attention and
``torch.optim.AdamW`` (foreach), under the same autocast, also compiled when ``--compile`` is on
if ``--compile-baseline`` is given. The two alternate, step by step, so that load from elsewhere
hits both alike. On a CPU, glibc's malloc is set up as `lmforge train` sets it (keep freed memory,
``keep_freed_memory``) for the whole process, so both loops get it; ``--stock-malloc`` leaves it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.config import ModelConfig, OptimConfig, from_dict
from lmforge.hardware import peak_flops
from lmforge.model.gpt import GPT, flops_per_token
from lmforge.runtime import Runtime, keep_freed_memory, maybe_compile, resolve_precision
from lmforge.training.optim import build_optimizer

SIZES = {  # name: (preset, vocab, context, batch)
    "tiny": ("gpt2-tiny", 4096, 256, 16),
    "small": ("gpt2-small", 4096, 256, 16),
    "124m": ("gpt2-124m", 50304, 1024, 2),
}


def lmforge_step(cfg: ModelConfig, device: torch.device, compile_: bool):
    model = GPT(cfg).to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-4), device)
    fwd = maybe_compile(model, compile_)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model.num_params()


def hf_step(cfg: ModelConfig, device: torch.device, compile_: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, activation_function="gelu", tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(hf_cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    fwd = torch.compile(model) if compile_ else model

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # HF shifts labels itself: pass the inputs as labels (same loss as x -> y).
        loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(steps: dict, batches: list, device: torch.device, dtype, warmup: int, reps: int) -> dict:
    times = {name: [] for name in steps}
    for i in range(warmup + reps):
        x, y = batches[i % len(batches)]
        for name, step in steps.items():
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = step(x, y)
            loss.item()  # one sync per step, in both, so the timing covers the whole step
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,124m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile lmforge's model")
    ap.add_argument("--compile-baseline", action="store_true", help="torch.compile the transformers model too")
    ap.add_argument("--batch", type=int, help="override every size's batch")
    ap.add_argument("--context", type=int, help="override every size's context")
    ap.add_argument("--stock-malloc", action="store_true",
                    help="leave glibc's malloc as it is (lmforge's runtime makes it keep freed memory)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    # What `lmforge train` does (the CLI's process-wide setting), so the baseline gets it too.
    kept = device.type == "cpu" and not args.stock_malloc and keep_freed_memory()
    precision = resolve_precision(args.precision, device)
    dtype = Runtime(device, precision).autocast_dtype
    peak, peak_source = peak_flops(device, dtype or torch.float32)
    print(f"device {device} | {precision} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source}) | malloc keeps freed memory: {kept}")
    results = []
    for size in args.sizes.split(","):
        preset, vocab, context, batch = SIZES[size]
        context, batch = args.context or context, args.batch or batch
        cfg = from_dict(ModelConfig, {"preset": preset, "vocab_size": vocab, "block_size": context,
                                     "dropout": 0.0})
        torch.manual_seed(0)
        ours, n_params = lmforge_step(cfg, device, args.compile)
        theirs = hf_step(cfg, device, args.compile and args.compile_baseline)
        batches = []
        for _ in range(4):
            data = torch.randint(0, vocab, (batch, context + 1), device=device)
            batches.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
        med = time_pair({"lmforge": ours, "transformers": theirs}, batches, device, dtype, args.warmup, args.reps)
        tokens = batch * context
        flops_tok = flops_per_token(cfg, n_params, context)
        row = {"size": size, "params_M": n_params / 1e6, "batch": batch, "context": context,
               "precision": precision, "compile": args.compile}
        for name, t in med.items():
            row[f"{name}_tok_s"] = tokens / t
            row[f"{name}_mfu"] = tokens / t * flops_tok / peak
        row["ratio"] = row["lmforge_tok_s"] / row["transformers_tok_s"]
        results.append(row)
        print(f"{size:>5} {n_params / 1e6:6.1f}M  b{batch}x{context}  lmforge {row['lmforge_tok_s']:9,.0f} tok/s "
              f"(MFU {row['lmforge_mfu']:.1%})  transformers {row['transformers_tok_s']:9,.0f} tok/s "
              f"(MFU {row['transformers_mfu']:.1%})  ratio {row['ratio']:.2f}x", flush=True)
        del ours, theirs
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "peak_flops": peak, "peak_source": peak_source, "malloc_kept": kept,
                       "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
