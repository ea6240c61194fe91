"""Decode speed: lmforge's KV-cache generation vs `transformers` ``generate()`` on the same weights.

    python bench/generate_speed.py [--preset gpt2-small | --run RUN_DIR] [--reps 5] [--compile] [--json out.json]

The transformers model is our model exported in memory (``lmforge.model.hf.to_hf_model``), so both
hold identical weights. Greedy decoding, prompt of ``--prompt-len`` random tokens, ``--new-tokens``
new ones, batch 1 and 8; the two alternate, and each figure is the median of ``--reps`` timed
repetitions after one warm-up. Tokens/s counts new tokens (batch x new tokens / wall time,
prefill included). Both run in fp32 by default; ``--precision bf16`` casts both models' weights to
bf16 (``.to(torch.bfloat16)``): for decoding that is the fastest path for each, since autocast
re-casts every weight at every step (on a CPU, lmforge under autocast decoded 2x slower at batch 1
than cast to bf16). The script checks whether both produce the same tokens (at batch 1 they
should; in bf16, or at larger batches where other kernels run, rounding may change a near tie).
On a shared or small machine, pin ``--threads``: oversubscribed cores make decode timings useless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.generate import generate
from lmforge.model.gpt import GPT
from lmforge.model.hf import to_hf_model
from lmforge.runtime import maybe_compile


def build_model(args: argparse.Namespace, device: torch.device) -> GPT:
    if args.run:
        from lmforge.loading import load_run

        return load_run(args.run, device).model.eval()
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": args.preset, "vocab_size": args.vocab, "dropout": 0.0,
                                 "block_size": args.prompt_len + args.new_tokens})
    return GPT(cfg).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--run", help="a trained run directory instead of random weights")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch; 0 leaves its default")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile lmforge's model (dynamic shapes, as `lmforge generate --compile`); the "
                         "compile happens in the warm-up and is reported apart")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args, device)
    block, n_new = model.cfg.block_size, args.new_tokens
    if args.prompt_len >= block:
        ap.error(f"--prompt-len {args.prompt_len} leaves no room in the model's context of {block} tokens")
    if args.prompt_len + n_new > block:  # a trained run's context: GPT-2's position table ends there
        n_new = block - args.prompt_len
        print(f"note: the context is {block} tokens: generating {n_new} new tokens, not {args.new_tokens}")
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    hf = to_hf_model(model)  # same device and dtype as ours
    vocab = model.cfg.vocab_size
    print(f"model {model.num_params() / 1e6:.1f}M params | {device} | {args.precision} | prompt {args.prompt_len} | "
          f"{n_new} new tokens | torch {torch.__version__} | threads {torch.get_num_threads()}")

    step_model = maybe_compile(model, args.compile, dynamic=True)

    def ours(prompts: torch.Tensor) -> list[list[int]]:
        return generate(step_model, prompts.tolist(), n_new, temperature=0.0)

    @torch.inference_mode()
    def theirs(prompts: torch.Tensor) -> list[list[int]]:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()

    results = []
    print(f"{'batch':>5} {'lmforge tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}  same greedy tokens")
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)
        times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
        outputs = {}
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            for name, fn in (("lmforge", ours), ("transformers", theirs)):
                sync(device)
                t = time.perf_counter()
                outputs[name] = fn(prompts)  # .tolist() syncs: the time covers the whole generation
                if rep > 0:
                    times[name].append(time.perf_counter() - t)
                elif name == "lmforge" and args.compile:
                    print(f"batch {batch}: warm-up with compilation took {time.perf_counter() - t:.1f} s")
        row = {"batch": batch, "precision": args.precision, "compile": args.compile}
        for name, ts in times.items():
            row[f"{name}_tok_s"] = batch * n_new / statistics.median(ts)
        row["ratio"] = row["lmforge_tok_s"] / row["transformers_tok_s"]
        row["same_tokens"] = outputs["lmforge"] == outputs["transformers"]
        results.append(row)
        print(f"{batch:>5} {row['lmforge_tok_s']:>14,.0f} {row['transformers_tok_s']:>19,.0f} "
              f"{row['ratio']:>6.2f}x  {row['same_tokens']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "params": model.num_params(), "prompt_len": args.prompt_len, "new_tokens": n_new,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
