"""Decode speed: lmforge's KV-cache generation vs `transformers` ``generate()`` on the same weights.

    python bench/generate_speed.py [--preset gpt2-small | --run RUN_DIR] [--reps 5] [--json out.json]

The transformers model is our model exported in memory (``lmforge.interop.to_hf_model``), so both
hold identical weights. Greedy decoding, prompt of ``--prompt-len`` random tokens, ``--new-tokens``
new ones, batch 1 and 8; the two alternate, and each figure is the median of ``--reps`` timed
repetitions after one warm-up. Tokens/s counts new tokens (batch x new tokens / wall time,
prefill included). Both run in fp32 by default; ``--precision bf16`` runs lmforge under bf16
autocast and the transformers model cast to bf16 (its fastest bf16 path on a CPU). At batch 1 the
script checks that both produce the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.generate import generate
from lmforge.interop import to_hf_model
from lmforge.model.gpt import GPT


def build_model(args: argparse.Namespace) -> GPT:
    if args.run:
        from lmforge.run import load_run

        return load_run(args.run).model.eval()
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": args.preset, "vocab_size": args.vocab, "dropout": 0.0,
                                 "block_size": args.prompt_len + args.new_tokens})
    return GPT(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--run", help="a trained run directory instead of random weights")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    model = build_model(args)
    hf = to_hf_model(model)
    bf16 = args.precision == "bf16"
    if bf16:
        hf = hf.to(torch.bfloat16)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    vocab, n_new = model.cfg.vocab_size, args.new_tokens
    print(f"model {model.num_params() / 1e6:.1f}M params | {args.precision} | prompt {args.prompt_len} | "
          f"{n_new} new tokens | torch threads {torch.get_num_threads()}")

    def ours(prompts: torch.Tensor) -> list[list[int]]:
        with ctx():
            return generate(model, prompts.tolist(), n_new, temperature=0.0)

    @torch.no_grad()
    def theirs(prompts: torch.Tensor) -> list[list[int]]:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()

    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
        outputs = {}
        for rep in range(args.reps + 1):
            for name, fn in (("lmforge", ours), ("transformers", theirs)):
                t = time.perf_counter()
                outputs[name] = fn(prompts)
                if rep > 0:
                    times[name].append(time.perf_counter() - t)
        row = {"batch": batch, "precision": args.precision}
        for name, ts in times.items():
            row[f"{name}_tok_s"] = batch * n_new / statistics.median(ts)
        row["ratio"] = row["lmforge_tok_s"] / row["transformers_tok_s"]
        row["same_tokens"] = outputs["lmforge"] == outputs["transformers"]
        results.append(row)
        print(f"batch {batch}: lmforge {row['lmforge_tok_s']:8,.0f} tok/s | transformers "
              f"{row['transformers_tok_s']:8,.0f} tok/s | ratio {row['ratio']:.2f}x | same greedy tokens: "
              f"{row['same_tokens']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": model.num_params(), "prompt_len": args.prompt_len, "new_tokens": n_new,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
