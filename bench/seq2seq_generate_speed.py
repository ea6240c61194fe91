"""Encoder-decoder generation speed: lmforge's (``lmforge.generate_seq2seq``) vs ``transformers``' ``generate()`` on
the same weights.

    python bench/seq2seq_generate_speed.py [--preset seq2seq-mini] [--source-len 128] [--new-tokens 128]
        [--batches 1,8] [--beams 1,4] [--rounds 5] [--threads 2] [--json bench/results/seq2seq_generate_speed.json]
    python bench/seq2seq_generate_speed.py --quick     # a few seconds: checks that it runs, measures nothing

A BART-shaped model of the preset with random weights (seeded), exported in memory to a
``BartForConditionalGeneration`` (``lmforge.model.hf.to_hf_model``, generation settings as ``lmforge export`` writes
them), so both hold identical weights. Every output runs to ``--new-tokens``: end-of-text's output bias is -1e4 in
both models, so neither greedy decoding nor beam search (which then never finishes a hypothesis early) stops
sooner, and both do the same work. Greedy and beam search (length penalty 1, transformers' ``early_stopping=False``)
over a batch of ``--source-len``-token random sources. The two take turns (:func:`lmforge.compress.timing.
time_alternating`: one warm-up each, then ``--rounds`` rounds); each figure is the median with its min-max over the
rounds, the ratio taken within each round. Tokens/s counts new tokens of the returned outputs (batch x new tokens /
wall time, the encoder included), not the beams' extra work. fp32 on the CPU by default. The script also checks that
both wrote the same tokens (they should: the same algorithm on the same weights; a near-tie may differ under other
kernels). On a shared or small machine pin ``--threads`` and keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.compress.timing import Spread, format_ratio, format_spread, ratio_per_round, time_alternating
from lmforge.config import ModelConfig, from_dict
from lmforge.data.seq2seq import Seq2SeqTokens, pad_batch
from lmforge.generate_seq2seq import generate_seq2seq
from lmforge.hardware import cpu_name
from lmforge.interop import set_seq2seq_generation
from lmforge.model import EncoderDecoder, build_model
from lmforge.model.hf import to_hf_model

RESULTS = Path(__file__).parent / "results" / "seq2seq_generate_speed.json"
TOKENS = Seq2SeqTokens(eos=0, pad=1, mask=2)
"""The special ids of the random model's vocabulary."""


def random_model(preset: str, vocab: int, device: torch.device) -> EncoderDecoder:
    """The preset's shape with random weights; end-of-text never chosen (its output bias -1e4)."""
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": preset, "vocab_size": vocab, "dropout": 0.0}))
    with torch.no_grad():
        model.lm_head.bias[TOKENS.eos] = -1e4
    return model.to(device).eval()


def measure(model: EncoderDecoder, hf: torch.nn.Module, sources: list[list[int]], n: int, beams: int, rounds: int,
            device: torch.device) -> tuple[list[list[float]], dict[str, list[list[int]]]]:
    """(seconds of lmforge's rounds, of transformers' rounds; the last tokens each wrote), taking turns."""
    ids, mask = (t.to(device) for t in pad_batch(sources, TOKENS.pad))
    outputs: dict[str, list[list[int]]] = {}

    def ours() -> None:
        outputs["lmforge"] = generate_seq2seq(model, sources, n, TOKENS, temperature=0.0, beams=beams)

    @torch.inference_mode()
    def theirs() -> None:
        # max_length counts the decoder's start token: n new ones (max_new_tokens would warn that the export's
        # max_length is set too).
        out = hf.generate(ids, attention_mask=mask.long(), num_beams=beams, do_sample=False, max_length=n + 1,
                          early_stopping=False, length_penalty=1.0)
        outputs["transformers"] = out[:, 1:].tolist()  # past the decoder's start token

    return time_alternating([ours, theirs], rounds), outputs


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="seq2seq-mini")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--source-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch; 0 leaves its default")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one round: checks that the script runs")
    ap.add_argument("--json", help="write the results here (default bench/results/seq2seq_generate_speed.json; "
                                   "--quick: nowhere)")
    args = ap.parse_args()
    if args.quick:
        args.source_len, args.new_tokens, args.rounds, args.batches = 16, 8, 1, "1,2"
    out = Path(args.json) if args.json else (None if args.quick else RESULTS)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = random_model(args.preset, args.vocab, device)
    block = model.cfg.block_size
    if args.source_len > block or args.new_tokens > block:
        ap.error(f"--source-len and --new-tokens must fit the model's context of {block} tokens")
    hf = to_hf_model(model)  # same device and dtype as ours
    set_seq2seq_generation(hf, TOKENS, block)
    n = args.new_tokens
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": str(device),
               "torch": torch.__version__, "python": platform.python_version()}
    print(f"{args.preset}: {model.num_params() / 1e6:.1f}M params | {machine['cpu']} | {device} | fp32 | source "
          f"{args.source_len} | {n} new tokens | threads {machine['threads']} | {args.rounds} rounds")

    results = []
    print(f"{'beams':>5} {'batch':>5} {'lmforge tok/s':>22} {'transformers tok/s':>22} {'ratio':>26}  same tokens")
    for beams in (int(b) for b in args.beams.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            sources = [torch.randint(3, args.vocab, (args.source_len - 1,), generator=g).tolist() + [TOKENS.eos]
                       for _ in range(batch)]
            seconds, outputs = measure(model, hf, sources, n, beams, args.rounds, device)
            speed = {name: Spread.of([batch * n / s for s in ts]) for name, ts in zip(("lmforge", "transformers"),
                                                                                        seconds, strict=True)}
            ratio = ratio_per_round(seconds[1], seconds[0])  # lmforge's speed / transformers'
            same = outputs["lmforge"] == outputs["transformers"]
            results.append({"beams": beams, "batch": batch, "lmforge_tok_s": asdict(speed["lmforge"]),
                            "transformers_tok_s": asdict(speed["transformers"]), "ratio": asdict(ratio),
                            "same_tokens": same})
            print(f"{beams:>5} {batch:>5} {format_spread(speed['lmforge'], 0):>22} "
                  f"{format_spread(speed['transformers'], 0):>22} {format_ratio(ratio):>26}  {same}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("preset", "vocab", "source_len", "new_tokens", "rounds")}
        out.write_text(json.dumps({"machine": machine, "settings": settings, "precision": "fp32",
                                   "results": results}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
