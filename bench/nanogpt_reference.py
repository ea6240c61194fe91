"""A plain-PyTorch reference for nanoGPT's Shakespeare-char CPU recipe, to judge lmforge's figure.

nanoGPT's README gives val loss 1.88 for ``train.py config/train_shakespeare_char.py --device=cpu
--compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``. This script trains that recipe with a
minimal independent implementation of the same algorithm (GPT-2 block without biases, tied
embeddings, N(0, 0.02) init with 1/sqrt(2L) on residual projections, AdamW decay/no-decay groups,
warmup 100 then cosine to 1e-4, clip 1.0, random windows, fp32) on an lmforge-prepared dataset, and
evaluates it two ways:

* ``estimate``: nanoGPT's own number, the mean loss of 20 random val batches of 12 x 64;
* ``whole``: the loss over every non-overlapping 64-token window of the val split.

``--run RUN_DIR`` evaluates a finished lmforge run with the very same two evaluators instead.

    lmforge prepare ../shared/data/tinyshakespeare.txt --tokenizer char --val-fraction 0.1 --out /tmp/shk
    python bench/nanogpt_reference.py /tmp/shk --seeds 1337 1 2 3 4
    python bench/nanogpt_reference.py /tmp/shk --run runs/shakespeare-char
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK, BATCH, STEPS, WARMUP, LR, MIN_LR = 64, 12, 2000, 100, 1e-3, 1e-4
N_LAYER, N_HEAD, N_EMBD = 4, 4, 128


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(N_EMBD, bias=False), nn.LayerNorm(N_EMBD, bias=False)
        self.qkv, self.attn_out = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False), nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.up, self.down = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False), nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_out(y)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.head = nn.Linear(N_EMBD, vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attn_out.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / (WARMUP + 1)
    ratio = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def windows(data: np.ndarray, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([data[s:s + BLOCK + 1] for s in starts.tolist()]).astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(logits_fn, val: np.ndarray, seed: int) -> dict[str, float]:
    """nanoGPT's 20-batch estimate and the loss over every non-overlapping window of the split."""
    g = torch.Generator().manual_seed(seed)
    est = [F.cross_entropy(logits_fn(x).flatten(0, 1), y.flatten()).item()
           for x, y in (windows(val, torch.randint(len(val) - BLOCK, (BATCH,), generator=g)) for _ in range(20))]
    starts = torch.arange(0, len(val) - BLOCK - 1, BLOCK)
    total, count = 0.0, 0
    for part in starts.split(256):
        x, y = windows(val, part)
        total += F.cross_entropy(logits_fn(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return {"estimate": statistics.fmean(est), "whole": total / count}


def train_reference(train: np.ndarray, vocab: int, seed: int) -> tuple[RefGPT, float]:
    torch.manual_seed(seed)
    model = RefGPT(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    t0 = time.perf_counter()
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = windows(train, torch.randint(len(train) - BLOCK, (BATCH,)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="lmforge-prepared character-level tinyshakespeare folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337])
    ap.add_argument("--run", help="evaluate this lmforge run instead of training the reference")
    ap.add_argument("--out", default="bench/results/nanogpt_reference.json")
    args = ap.parse_args()
    meta = json.loads((Path(args.dataset) / "meta.json").read_text())
    train, val = (np.memmap(Path(args.dataset) / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in ("train", "val"))
    rows = []
    if args.run:
        from lmforge.loading import load_run

        model = load_run(args.run).model
        rows.append({"model": f"lmforge {args.run}", **evaluate(lambda x: model(x)[0], val, 1337)})
    else:
        for seed in args.seeds:
            model, wall = train_reference(train, meta["vocab_size"], seed)
            rows.append({"model": "reference", "seed": seed, "train_s": round(wall, 1), **evaluate(model, val, seed)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'model':<32} {'seed':>5} {'estimate':>9} {'whole':>7}")
    for r in rows:
        print(f"{r['model']:<32} {r.get('seed', '-'):>5} {r['estimate']:>9.4f} {r['whole']:>7.4f}")
    if len(rows) > 1:
        print(f"mean whole-split loss {statistics.fmean(r['whole'] for r in rows):.4f}, "
              f"mean estimate {statistics.fmean(r['estimate'] for r in rows):.4f}")
    if not args.run:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
