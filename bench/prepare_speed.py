"""`lmforge prepare` speed and memory: tokenize-and-write throughput vs raw ``tokenizers``, peak RSS.

    python bench/prepare_speed.py [--workers N] [--reps 3] [--sizes 10,100] [--tokenizer tok.json]
                                  [--json out.json]

1. Throughput on the default corpus (the Python standard library sources) with an already trained
   tokenizer (a byte-level BPE of 4096 trained once here with lmforge, or ``--tokenizer``), so no
   tokenizer training is timed:
   - lmforge: ``prepare(DataConfig(tokenizer=<file>, workers=N))`` end to end (read + dedupe/split
     pass, re-read, tokenize in N worker processes, write train.bin/val.bin); the tokenize-and-write
     pass alone (``_tokenize``, which includes the re-read) is timed too;
   - baseline: the same documents' text, read into memory beforehand (not timed), through the
     ``tokenizers`` library's own ``Tokenizer.encode_batch`` in batches of ``--batch`` documents,
     with ``RAYON_NUM_THREADS=N`` (the threads ``tokenizers`` parallelises over); ``encode_batch_fast``
     (no offsets, what lmforge calls) is reported too. (With ``--workers 1`` lmforge encodes in its
     own process, on the same ``RAYON_NUM_THREADS=1`` thread pool.)
   Both are fed the same bytes (the UTF-8 size of the source files is the MB in MB/s); each rep runs
   lmforge then both baselines, so load from elsewhere hits all alike; medians of ``--reps``.
2. Peak memory of ``python -m lmforge prepare DIR --out OUT --tokenizer <file> --workers N`` as a
   subprocess, on generated corpora of about ``--sizes`` MB: a unit of standard library files of the
   smallest size (the largest file plus others in a seeded random order), copied as many times as
   each size needs into a temp folder, each copy's files with a first line naming the copy, so exact
   de-dup keeps them all, and every corpus has the same mix of document sizes:
   the largest single process's peak RSS ("any process": ``ru_maxrss`` of ``RUSAGE_CHILDREN`` in a
   small wrapper process, which covers the worker processes too); the peaks of the main process and
   of the largest worker (their ``VmHWM``, sampled every 20 ms); and the peak of the sum of RSS over
   the process tree (same sampling; pages shared between the main process and its forked workers
   count once per process there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def process_tree(pid: int) -> dict[int, int]:
    """Every process below ``pid`` (from /proc's parent links), with its depth below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, int] = {}
    todo = [(c, 1) for c in children.get(pid, [])]
    while todo:
        p, depth = todo.pop()
        found[p] = depth
        todo += [(c, depth + 1) for c in children.get(p, [])]
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


RUSAGE_WRAPPER = """import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""
"""Runs a command and writes its peak RSS (KiB). Not measured straight from this process: a child
started from a big process inherits that process's peak RSS in ``ru_maxrss`` (fork/vfork + exec),
so the command is started from this small interpreter instead."""


def run_measured(cmd: list[str], env: dict, work: Path) -> dict:
    """Run ``cmd``; its wall time, largest single-process peak RSS and tree-sum peak RSS."""
    maxrss_file = work / "maxrss"
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUSAGE_WRAPPER, str(maxrss_file), *cmd], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree_peak = [0]
    hwm: dict[int, tuple[int, int]] = {}  # pid -> (depth below the wrapper, peak RSS seen)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            # Depth 1: the prepare process; depth 2: its worker processes.
            tree = process_tree(proc.pid)
            total = 0
            for p, depth in tree.items():
                rss, peak = memory_kb(p)
                total += rss
                hwm[p] = (depth, max(peak, hwm.get(p, (0, 0))[1]))
            tree_peak[0] = max(tree_peak[0], total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output.decode(errors='replace')}")
    # Linux: ru_maxrss of the waited-for child is max(its own peak, its reaped workers' peaks).
    maxrss_kb = int(maxrss_file.read_text())
    main = [peak for depth, peak in hwm.values() if depth == 1]
    workers = [peak for depth, peak in hwm.values() if depth == 2]
    return {"wall_s": wall, "max_process_rss_mb": maxrss_kb * 1024 / 1e6,
            "main_rss_mb": max(main, default=0) * 1024 / 1e6,
            "max_worker_rss_mb": max(workers, default=0) * 1024 / 1e6,
            "tree_rss_mb": tree_peak[0] * 1024 / 1e6}


def corpus_unit(sources: list[str], target_bytes: int) -> list[bytes]:
    """Standard library files making up about ``target_bytes``: the largest one, then others in a
    seeded random order. Every generated corpus is copies of this one unit, so the corpora differ in
    size only, not in the sizes of their documents (which set a worker's memory: see the chunks)."""
    paths = sorted(sources, key=os.path.getsize, reverse=True)
    rest = paths[1:]
    random.Random(0).shuffle(rest)
    unit, total = [], 0
    for p in [paths[0], *rest]:
        if total >= target_bytes:
            break
        unit.append(Path(p).read_bytes())
        total += len(unit[-1])
    return unit


def make_corpus(folder: Path, copies: int, unit: list[bytes]) -> tuple[int, int]:
    """``copies`` copies of ``unit`` as files in ``folder``, each file's first line naming its copy
    (so exact de-dup keeps them all); (bytes, files) written."""
    total = files = 0
    for copy in range(copies):
        sub = folder / f"copy{copy:03d}"
        sub.mkdir(parents=True)
        for i, data in enumerate(unit):
            data = f"# copy {copy} of file {i}\n".encode() + data
            (sub / f"{i:05d}.py").write_bytes(data)
            total += len(data)
            files += 1
    return total, files


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="lmforge worker processes = RAYON_NUM_THREADS of the baseline (default: cores)")
    ap.add_argument("--reps", type=int, default=3, help="throughput repetitions (0 skips them)")
    ap.add_argument("--batch", type=int, default=1000, help="documents per encode_batch call of the baseline")
    ap.add_argument("--sizes", default="10,100", help="MB of the generated corpora for the memory runs ('' skips)")
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: train a BPE of --vocab-size with lmforge)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    # Before tokenizers starts its thread pool (lmforge imports it): the baseline's thread count.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    import tokenizers

    import lmforge.data.prepare as prep
    from lmforge.config import DataConfig
    from lmforge.data.corpus import default_corpus_sources
    from lmforge.data.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="lmforge-prepare-bench-"))
    try:
        sources = default_corpus_sources()
        raw = [Path(p).read_bytes() for p in sources]
        n_bytes = sum(map(len, raw))
        texts = [b.decode("utf-8", errors="replace") for b in raw]
        del raw

        if args.tokenizer:
            tok_path = Path(args.tokenizer)
        else:
            t = time.perf_counter()
            tok_path = work / "tokenizer.json"
            Tokenizer.train_bpe(texts, args.vocab_size).save(tok_path)
            print(f"trained BPE {args.vocab_size} on the default corpus in {time.perf_counter() - t:.1f}s")
        hf = tokenizers.Tokenizer.from_file(str(tok_path))
        print(f"python {sys.version.split()[0]} | tokenizers {tokenizers.__version__} | cores {os.cpu_count()} | "
              f"lmforge workers {args.workers} | baseline RAYON_NUM_THREADS {args.workers} | "
              f"default corpus {len(texts)} files, {n_bytes / 1e6:.1f} MB")

        throughput: dict = {}
        if args.reps > 0:  # 0: memory runs only
            def baseline(method: str) -> float:
                encode = getattr(hf, method)
                t = time.perf_counter()
                for i in range(0, len(texts), args.batch):
                    encode(texts[i:i + args.batch], add_special_tokens=False)
                return time.perf_counter() - t

            tokenize_s: list[float] = []
            original_tokenize = prep._tokenize

            def timed_tokenize(*a, **kw):
                t = time.perf_counter()
                try:
                    return original_tokenize(*a, **kw)
                finally:
                    tokenize_s.append(time.perf_counter() - t)

            def lmforge_run(rep: int) -> float:
                out = work / f"ds{rep}"
                cfg = DataConfig(tokenizer=str(tok_path), workers=args.workers)
                t = time.perf_counter()
                prep.prepare(cfg, out, progress=False)
                elapsed = time.perf_counter() - t
                shutil.rmtree(out)
                return elapsed

            methods = ["encode_batch"] + (["encode_batch_fast"] if hasattr(hf, "encode_batch_fast") else [])
            for m in methods:  # warm-up: the BPE word cache, the thread pool, the page cache
                baseline(m)
            times: dict[str, list[float]] = {"lmforge": [], **{m: [] for m in methods}}
            prep._tokenize = timed_tokenize
            try:
                for rep in range(args.reps):
                    times["lmforge"].append(lmforge_run(rep))
                    for m in methods:
                        times[m].append(baseline(m))
            finally:
                prep._tokenize = original_tokenize
            med = {name: statistics.median(ts) for name, ts in times.items()}
            speed = {name: n_bytes / 1e6 / t for name, t in med.items()}
            stage = n_bytes / 1e6 / statistics.median(tokenize_s)
            throughput = {
                "corpus_bytes": n_bytes, "documents": len(texts), "workers": args.workers,
                "rayon_threads": args.workers, "batch_docs": args.batch, "reps": args.reps,
                "lmforge_prepare_mb_s": speed["lmforge"], "lmforge_tokenize_stage_mb_s": stage,
                "encode_batch_mb_s": speed["encode_batch"],
                "ratio_prepare_vs_encode_batch": speed["lmforge"] / speed["encode_batch"],
                "ratio_tokenize_stage_vs_encode_batch": stage / speed["encode_batch"],
                "times_s": times, "tokenize_stage_times_s": tokenize_s,
            }
            if "encode_batch_fast" in speed:
                throughput["encode_batch_fast_mb_s"] = speed["encode_batch_fast"]
                throughput["ratio_prepare_vs_encode_batch_fast"] = speed["lmforge"] / speed["encode_batch_fast"]
            print(f"\nthroughput on the default corpus ({n_bytes / 1e6:.1f} MB; median of {args.reps})")
            print(f"  {'':34} {'MB/s':>7} {'vs encode_batch':>16} {'vs _fast':>9}")
            rows = [("lmforge prepare (end to end)", speed["lmforge"]),
                    ("lmforge tokenize+write pass", stage),
                    ("tokenizers encode_batch", speed["encode_batch"])]
            if "encode_batch_fast" in speed:
                rows.append(("tokenizers encode_batch_fast", speed["encode_batch_fast"]))
            for name, s in rows:
                fast = f"{s / speed['encode_batch_fast']:9.2f}" if "encode_batch_fast" in speed else ""
                print(f"  {name:34} {s:7.2f} {s / speed['encode_batch']:16.2f} {fast}")

        memory = []
        sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
        if sizes:
            print(f"\n`python -m lmforge prepare` subprocess, --workers {args.workers}, tokenizer file")
            print(f"  {'corpus':>9} {'files':>6} {'MB/s':>6}   peak RSS (MB): {'any process':>11} "
                  f"{'main':>5} {'worker':>6} {'tree sum':>8}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(prep.__file__).parents[2]),
                                                                          os.environ.get("PYTHONPATH")]))}
        env.pop("RAYON_NUM_THREADS")  # as a user runs it
        unit = corpus_unit(sources, int(min(sizes) * 1e6)) if sizes else []
        for size in sizes:
            folder = work / f"corpus{size:g}"
            total, files = make_corpus(folder, max(1, round(size / min(sizes))), unit)
            out = work / f"out{size:g}"
            res = run_measured([sys.executable, "-m", "lmforge", "prepare", str(folder), "--out", str(out),
                                "--tokenizer", str(tok_path), "--workers", str(args.workers)], env, work)
            shutil.rmtree(folder)
            shutil.rmtree(out)
            row = {"target_mb": size, "corpus_bytes": total, "files": files,
                   "mb_s": total / 1e6 / res["wall_s"], **res}
            memory.append(row)
            print(f"  {total / 1e6:6.1f} MB {files:6d} {row['mb_s']:6.2f} {'':15}{res['max_process_rss_mb']:11.0f} "
                  f"{res['main_rss_mb']:5.0f} {res['max_worker_rss_mb']:6.0f} {res['tree_rss_mb']:8.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
                       "cores": os.cpu_count(), "throughput": throughput, "memory": memory}, f, indent=1)


if __name__ == "__main__":
    main()
