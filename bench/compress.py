"""What compression costs and gains on trained runs: the acceptance figures of issue 17.

    python bench/compress.py quantize RUN [RUN ...] [--windows 64] [--json OUT]
    python bench/compress.py prune RUN [--steps 100] [--windows 64] [--json OUT]
    python bench/compress.py gguf RUN [--windows 64] [--json OUT]
    python bench/compress.py structured RUN [RUN ...] [--rounds 5] [--json OUT]

quantize: per run, the same windows (its val split) and prompts for fp32 (what this CPU trains in), bf16
weights (the baseline the issue names), int8, int4 g32, and int8 with the embeddings included: val perplexity,
Linear bytes (ratio to bf16), decode tokens/s at batch 1 and 8 (greedy, 16-token prompts + 32 new tokens; all
variants held at once and timed in ``--rounds`` interleaved rounds, the median of each, after a warm-up), all in
this one process.

prune: 50% unstructured magnitude vs Wanda without recovery; then (unless --steps 0) each of them, structured
25% of MLP neurons, and the dense model itself trained ``--steps`` more steps with the same recovery recipe
(``lmforge.compress.prune.recovery_config``): perplexity on the same windows; decode speed of the smaller model
against the source's, timed in interleaved rounds.

structured: decode speed of the source vs the same model with 25% of its MLP neurons removed (no recovery:
the shape is what sets the speed), interleaved rounds of 64 new tokens.

gguf: f16 / q8_0 / q4_0 export of a GGUF-expressible run, read back: per-tensor max error against the run's
weights (and the format's bound), file bytes, perplexity of the read-back weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.compress.gguf import export_gguf, read_gguf
from lmforge.compress.output import train_config_of, write_compressed_run
from lmforge.compress.prune import PruneSpec, prune_run, recovery_config
from lmforge.compress.report import (
    DECODE_BATCHES,
    decode_prompts,
    decode_speed,
    eval_windows,
    linear_bytes,
    windows_loss,
)
from lmforge.generate import generate
from lmforge.hardware import cpu_name
from lmforge.loading import load_run
from lmforge.model.quantized import QuantSpec, quantize_model
from lmforge.runtime import setup_runtime
from lmforge.training.pretrain import train


def bench_quantize(path: str, n_windows: int, rounds: int) -> dict:
    """Every variant held in memory at once, decode timed in interleaved rounds (the VM's speed drifts)."""
    rt = setup_runtime("cpu", "fp32")
    specs = {"fp32": None, "bf16": "bf16", "int8": QuantSpec("int8"), "int4-g32": QuantSpec("int4", 32),
             "int8+embeddings": QuantSpec("int8", include_embeddings=True)}
    run = load_run(path)
    windows = eval_windows(run, n_windows)
    models, out = {}, {}
    for name, spec in specs.items():
        model = load_run(path).model
        models[name] = model.to(torch.bfloat16) if spec == "bf16" else quantize_model(model, spec) if spec else model
        stored, params = linear_bytes(models[name])
        out[name] = {"val_ppl": math.exp(windows_loss(models[name], windows, rt)), "linear_bytes": stored,
                     "linear_vs_bf16": stored / (2 * params), "decode_tokens_per_s": {}}
    for batch in DECODE_BATCHES:
        prompts = decode_prompts(windows, run.tokenizer, batch)
        timings: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                timings[name].append(decode_speed(model, prompts, rt, reps=1))
        for name in models:
            out[name]["decode_tokens_per_s"][str(batch)] = statistics.median(timings[name])
    for name in models:
        speed = out[name]["decode_tokens_per_s"]
        out[name]["decode_vs_bf16"] = {b: v / out["bf16"]["decode_tokens_per_s"][b] for b, v in speed.items()}
        out[name]["decode_vs_fp32"] = {b: v / out["fp32"]["decode_tokens_per_s"][b] for b, v in speed.items()}
        out[name]["ppl_vs_fp32"] = out[name]["val_ppl"] / out["fp32"]["val_ppl"]
        print(name, json.dumps(out[name]), flush=True)
    return {"run": path, "params": run.model.num_params(), "windows": len(windows.tokens), "rounds": rounds,
            "variants": out}


def _dense_continued(path: str, out: Path, steps: int) -> Path:
    """The source trained ``steps`` more with the recovery recipe and no pruning: the fair comparison."""
    run = load_run(path)
    cfg = recovery_config(train_config_of(run), out, steps)
    write_compressed_run(run, cfg, run.model, out, {"method": "none", "source": str(run.checkpoint)})
    train(cfg, resume=True, progress=False)
    return out


def bench_prune(path: str, steps: int, n_windows: int, rounds: int) -> dict:
    rt = setup_runtime("cpu", "fp32")
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-prune-bench-"))
    results: dict = {"run": path, "steps": steps}
    for method in ("magnitude", "wanda"):
        r = prune_run(path, str(tmp / f"{method}-0"), PruneSpec(method, 0.5), windows=n_windows, speed=False)
        results[f"{method}-50%"] = {"dense_ppl": r.before.val_ppl, "pruned_ppl": r.after.val_ppl}
    if steps == 0:
        return results
    for name, spec in (("magnitude", PruneSpec("magnitude", 0.5)), ("wanda", PruneSpec("wanda", 0.5)),
                       ("structured-25%", PruneSpec("structured", ratio=0.25))):
        r = prune_run(path, str(tmp / name), spec, windows=n_windows, recover_steps=steps, progress=False)
        results[f"{name}+recovery"] = {"dense_ppl": r.before.val_ppl, "pruned_ppl": r.after.val_ppl,
                                       "recovered_ppl": r.recovered.val_ppl,
                                       "decode_before": r.before.decode_tokens_per_s,
                                       "decode_recovered": r.recovered.decode_tokens_per_s}
        print(name, json.dumps(results[f"{name}+recovery"]), flush=True)
    dense = load_run(_dense_continued(path, tmp / "dense", steps))
    source = load_run(path)
    windows = eval_windows(source, n_windows)
    results["dense+same-steps"] = {"ppl": math.exp(windows_loss(dense.model, windows, rt))}
    print("dense", json.dumps(results["dense+same-steps"]), flush=True)
    small = load_run(tmp / "structured-25%").model
    for batch in DECODE_BATCHES:
        prompts = decode_prompts(windows, source.tokenizer, batch)
        timings: dict[str, list[float]] = {"source": [], "structured": []}
        for _ in range(rounds):
            timings["source"].append(decode_speed(source.model, prompts, rt, reps=1))
            timings["structured"].append(decode_speed(small, prompts, rt, reps=1))
        results[f"structured-decode-batch-{batch}"] = {k: statistics.median(v) for k, v in timings.items()}
        print(batch, json.dumps(results[f"structured-decode-batch-{batch}"]), flush=True)
    return results


def bench_structured(path: str, rounds: int) -> dict:
    source = load_run(path)
    windows = eval_windows(source, 16)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-structured-bench-"))
    prune_run(path, str(tmp / "small"), PruneSpec("structured", ratio=0.25), windows=16, speed=False)
    small = load_run(tmp / "small").model
    results: dict = {"run": path, "hidden": source.model.cfg.mlp_hidden, "kept": small.cfg.intermediate_size,
                     "params": source.model.num_params(), "params_kept": small.num_params()}
    for batch in DECODE_BATCHES:
        prompts = decode_prompts(windows, source.tokenizer, batch)
        timings: dict[str, list[float]] = {"source": [], "structured": []}
        for _ in range(rounds):
            for name, model in (("source", source.model), ("structured", small)):
                generate(model, prompts, 8, temperature=0.0)  # warm-up
                t = time.perf_counter()
                generate(model, prompts, 64, temperature=0.0)
                timings[name].append(batch * 64 / (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in timings.items()}
        results[f"batch-{batch}"] = {**med, "speedup": med["structured"] / med["source"]}
        print(path, batch, json.dumps(results[f"batch-{batch}"]), flush=True)
    return results


def bench_gguf(path: str, n_windows: int) -> dict:
    rt = setup_runtime("cpu", "fp32")
    run = load_run(path)
    windows = eval_windows(run, n_windows)
    own = {k: v.detach().float().numpy() for k, v in run.model.state_dict().items()}
    results = {"run": path, "val_ppl": math.exp(windows_loss(run.model, windows, rt))}
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-gguf-bench-"))
    for qtype in ("f16", "q8_0", "q4_0"):
        file = export_gguf(run.model, run.tokenizer, tmp / f"model-{qtype}.gguf", qtype)
        _, tensors = read_gguf(file)
        errors = {k: float(np.abs(tensors[k] - v).max()) for k, v in own.items()}
        back = type(run.model)(run.model.cfg)
        back.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k in own})
        worst = max(errors, key=errors.get)
        results[qtype] = {"file_bytes": file.stat().st_size, "max_abs_error": errors[worst], "worst_tensor": worst,
                          "val_ppl": math.exp(windows_loss(back.eval(), windows, rt))}
        print(qtype, json.dumps(results[qtype]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quantize", "prune", "gguf", "structured"])
    p.add_argument("runs", nargs="+")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved decode timings per variant")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
    if args.what == "quantize":
        results = [bench_quantize(r, args.windows, args.rounds) for r in args.runs]
    elif args.what == "prune":
        results = [bench_prune(r, args.steps, args.windows, args.rounds) for r in args.runs]
    elif args.what == "structured":
        results = [bench_structured(r, args.rounds) for r in args.runs]
    else:
        results = [bench_gguf(r, args.windows) for r in args.runs]
    doc = {"machine": machine, "command": " ".join(sys.argv), "results": results}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
