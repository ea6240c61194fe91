"""Load on `lmforge serve` (loopback only): concurrent clients, continuous vs static batching, batch 16 vs 1.

    python bench/serve_load.py RUN [RUN ...] [--clients 32[,16,...]] [--requests 10] [--seed 0] [--setups ...]
                               [--json OUT]

Several runs (a float run and its int8/int4 quantizations, say) and several client counts make a table: every
setup for every run at every client count, one after another.

For each setup (``--max-batch 16``; ``--max-batch 16 --batching static``; ``--max-batch 1``; on request
``--max-batch 16 --prefix-cache-mib 0`` or ``--max-batch 16 --compile``) a fresh server is started on a free
loopback port; ``--clients`` threads each send ``--requests`` completions with the official ``openai`` client, one
after another, with ``max_tokens`` drawn from 8..128 (the same draws for every setup), temperature 1. Reported per
setup: errors, p50/p99 latency, aggregate completion tokens/s over the whole run, and the server's RSS after a
warm-up round and at the end. The setups run in one process, one after another.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from lmforge.hardware import cpu_name

SETUPS = {"continuous-16": ["--max-batch", "16"],
          "static-16": ["--max-batch", "16", "--batching", "static"],
          "continuous-1": ["--max-batch", "1"],
          "continuous-16-no-prefix-cache": ["--max-batch", "16", "--prefix-cache-mib", "0"],
          "continuous-16-compiled": ["--max-batch", "16", "--compile"]}
PROMPTS = ["def ", "import ", "class ", "    return ", "# ", "if __name__", "for i in ", "try:\n    "]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_setup(run: str, flags: list[str], draws: list[list[int]]) -> dict:
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", run, "--port", str(port),
                               "--max-queue", "256", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
        name = client.models.list().data[0].id

        def one(c: int, k: int) -> tuple[float, int, str | None]:
            t0 = time.perf_counter()
            try:
                out = client.completions.create(model=name, prompt=PROMPTS[(c + k) % len(PROMPTS)],
                                                max_tokens=draws[c][k], temperature=1.0, seed=c * 1000 + k)
                return time.perf_counter() - t0, out.usage.completion_tokens, None
            except openai.OpenAIError as e:
                return time.perf_counter() - t0, 0, f"{type(e).__name__}: {e}"

        def client_loop(c: int, first: int, last: int) -> list[tuple[float, int, str | None]]:
            return [one(c, k) for k in range(first, last)]

        clients = len(draws)
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:  # warm-up: one request per client
            list(pool.map(lambda c: client_loop(c, 0, 1), range(clients)))
        rss_start = _rss_mib(server.pid)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(lambda c: client_loop(c, 1, len(draws[c])), range(clients)) for r in rs]
        wall = time.perf_counter() - t0
        rss_end = _rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    errors = [r[2] for r in results if r[2] is not None]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "rss_start_mib": rss_start, "rss_end_mib": rss_end}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN")
    ap.add_argument("--clients", default="32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=10, help="per client, after one warm-up request each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setups", default="continuous-16,static-16,continuous-1", help=f"of {', '.join(SETUPS)}")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}",
               "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]), "setups": {}}
    for run, clients, name in itertools.product(args.runs, [int(c) for c in args.clients.split(",")],
                                                args.setups.split(",")):
        rng = random.Random(args.seed)  # the same draws for every run and setup
        draws = [[rng.randint(8, 128) for _ in range(args.requests + 1)] for _ in range(clients)]
        r = run_setup(run, SETUPS[name], draws)
        # One run and one client count: keyed by setup alone, as before.
        key = name if len(args.runs) == 1 and "," not in args.clients else f"{Path(run).name} {clients} {name}"
        results["setups"][key] = r
        print(f"{key:22s} {r['requests']} requests, {r['errors']} errors | p50 {r['p50_s']:.2f} s, p99 "
              f"{r['p99_s']:.2f} s | {r['tokens_per_s']:,.0f} tok/s ({r['tokens']} tokens in {r['wall_s']:.1f} s) | "
              f"RSS {r['rss_start_mib']:.0f} -> {r['rss_end_mib']:.0f} MiB"
              f"{' | first error: ' + r['first_error'] if r['first_error'] else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
