"""Time to first token with and without the prefix cache of `lmforge serve`, on chat workloads (loopback only).

    python bench/prefix_cache.py RUN [--rounds 5] [--json OUT]

Two servers on the run, started side by side: ``--prefix-cache-mib 0`` (off) and the default (on). Two workloads,
one request at a time (time to first token is then the prefill and the first step, not queueing):

- system: a long shared system prompt, then one user message, different every request;
- conversation: a new conversation (the same system prompt, then user turns), re-sent each turn with the answers
  so far, until the context is nearly full.

Each round runs both workloads on both servers, the order of the two servers alternating round to round, with fresh
user messages (no prompt is ever sent twice to one server). Time to first token: from sending a streamed chat
request to its first chunk with content (or its end). Reported per workload and server: median, min and max over
every request of every round, and the share of prompt tokens the cache reused (from /health).

``--in-process``: the same workloads on two engines in this process, no HTTP (token ids straight in, answers
appended as the ids generated, no chat template): time to first token from submitting a job to its first token,
so the figures are the prefill and the first sampling alone.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import torch

from lmforge.hardware import cpu_name
from lmforge.loading import load_lm
from lmforge.options import GREEDY
from lmforge.runtime import setup_runtime
from lmforge.serve.engine import Engine, Finished, Job

SYSTEM = ("You are a careful assistant for Python programmers. Answer in short plain sentences, then show one small "
          "example. Prefer the standard library, say which Python version a feature needs, and point out the usual "
          "mistakes: mutable default arguments, late binding in closures, bare excepts, files left open.")
NAMES = sorted(name for name in dir(builtins) if not name.startswith("_"))
SETUPS = {"off": ["--prefix-cache-mib", "0"], "on": []}
MAX_TOKENS = 16
TURNS_LEFT = 55
"""A conversation ends once fewer than this many tokens of the context are left (a turn adds up to ~40)."""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question(k: int) -> str:
    return f"What does {NAMES[k % len(NAMES)]} do (case {k})?"


class Server:
    def __init__(self, run: str, flags: list[str]):
        self.port = _port()
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", run, "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-", max_retries=0,
                                    timeout=600)
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models").read())["data"][0]
        self.model, self.context = model["id"], model["context_length"]

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health").read())

    def chat(self, messages: list[dict]) -> tuple[float, str, int]:
        """(time to first token in s, the answer, the prompt's tokens) of one greedy streamed request."""
        t0 = time.perf_counter()
        first, text, prompt_tokens = None, [], 0
        for chunk in self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=MAX_TOKENS,
                                                         temperature=0.0, stream=True,
                                                         stream_options={"include_usage": True}):
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if first is None and (choice.delta.content or choice.finish_reason):
                    first = time.perf_counter() - t0
                text.append(choice.delta.content or "")
        return first, "".join(text), prompt_tokens

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def system_workload(server: Server, first: int, n: int) -> list[float]:
    return [server.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(k)}])[0]
            for k in range(first, first + n)]


def conversation(server: Server, first: int) -> list[float]:
    messages, times, k = [{"role": "system", "content": SYSTEM}], [], first
    while True:
        messages.append({"role": "user", "content": question(k)})
        try:
            ttft, answer, prompt_tokens = server.chat(messages)
        except openai.BadRequestError as e:  # an answer re-encoded may take more tokens than it was generated as
            if e.code != "context_length_exceeded":
                raise
            return times
        times.append(ttft)
        messages.append({"role": "assistant", "content": answer})
        k += 1
        if server.context - prompt_tokens < TURNS_LEFT:
            return times


class InProcess:
    """An engine on the run in this process, with the chat workloads as token ids."""

    def __init__(self, loaded, rt, flags: list[str]):
        mib = float(flags[1]) if flags else 256.0
        self.engine = Engine(loaded.model, rt, prefix_cache_mib=mib)
        self.encode = loaded.tokenizer.encode
        self.context = loaded.model.cfg.block_size
        self.start = (0, 0)
        """The engine's (prompt, reused) token counts after the warm-up round."""

    def ask(self, prompt: list[int]) -> tuple[float, list[int]]:
        """(time to first token in s, the answer's ids) of one greedy job."""
        out: list[int] = []
        first: list[float] = []
        done = threading.Event()

        def emit(event) -> None:
            if isinstance(event, Finished):
                done.set()
            else:
                if not first:
                    first.append(time.perf_counter())
                out.append(event.id)

        t0 = time.perf_counter()
        self.engine.submit(Job(prompt, MAX_TOKENS, emit=emit, sampling=GREEDY))
        done.wait()
        return (first[0] if first else time.perf_counter()) - t0, out

    def system(self, first: int, n: int) -> list[float]:
        return [self.ask(self.encode(SYSTEM + "\n" + question(k)))[0] for k in range(first, first + n)]

    def conversation(self, first: int) -> list[float]:
        history, times, k = self.encode(SYSTEM), [], first
        while True:
            history = history + self.encode("\n" + question(k))
            if len(history) + MAX_TOKENS > self.context:
                return times
            ttft, answer = self.ask(history)
            times.append(ttft)
            history += answer
            k += 1


def in_process(run: str, rounds: int, requests: int) -> tuple[dict, dict]:
    rt = setup_runtime("cpu", "auto")
    loaded = load_lm(run, rt.device, "bench/prefix_cache.py")
    loaded.model.eval()
    engines = {name: InProcess(loaded, rt, flags) for name, flags in SETUPS.items()}
    times = {(w, name): [] for w in ("system", "conversation") for name in engines}
    for r in range(-1, rounds):  # round -1: warm-up, not counted
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            e = engines[name]
            e.engine.start()  # one engine at a time: they share the model's attention modules
            try:
                system, conversation = e.system(100 * r, requests), e.conversation(100 * r + 50)
            finally:
                e.engine.stop()
            if r >= 0:
                times["system", name] += system
                times["conversation", name] += conversation
            else:
                e.start = (e.engine.prompt_tokens, e.engine.reused_tokens)
    reused = {name: (e.engine.reused_tokens - e.start[1]) / max(1, e.engine.prompt_tokens - e.start[0])
              for name, e in engines.items()}
    return times, reused


def summary(times: list[float]) -> dict:
    return {"n": len(times), "median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times)}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=8, help="system workload: requests per round")
    ap.add_argument("--in-process", action="store_true", help="engines in this process, no HTTP (see above)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.in_process:
        times, reused = in_process(args.run, args.rounds, args.requests)
    else:
        times, reused = over_http(args.run, args.rounds, args.requests)
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, torch "
                          f"{torch.__version__}, {torch.get_num_threads()} threads",
               "command": "python bench/prefix_cache.py " + " ".join(sys.argv[1:]), "reused_share": reused,
               "ttft": {f"{w}/{name}": summary(t) for (w, name), t in times.items()}}
    for (w, name), t in times.items():
        s = summary(t)
        print(f"{w:13s} cache {name:3s} | {s['n']:3d} requests | time to first token median {s['median_ms']:6.1f} ms "
              f"(min {s['min_ms']:6.1f}, max {s['max_ms']:6.1f}) | prompt tokens reused {100 * reused[name]:.0f}% "
              f"(both workloads)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def over_http(run: str, rounds: int, requests: int) -> tuple[dict, dict]:
    servers = {name: Server(run, flags) for name, flags in SETUPS.items()}
    times = {(w, name): [] for w in ("system", "conversation") for name in servers}
    reused = {}
    try:
        for server in servers.values():  # warm-up: the first request of a fresh server is slow either way
            system_workload(server, 10_000, 2)
        start = {name: server.health() for name, server in servers.items()}
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                times["system", name] += system_workload(servers[name], 100 * r, requests)
            for name in order:
                times["conversation", name] += conversation(servers[name], 100 * r + 50)
        for name, server in servers.items():
            end = server.health()
            prompt = end["prompt_tokens"] - start[name]["prompt_tokens"]
            reused[name] = (end["reused_tokens"] - start[name]["reused_tokens"]) / max(1, prompt)
    finally:
        for server in servers.values():
            server.close()
    return times, reused


if __name__ == "__main__":
    main()
