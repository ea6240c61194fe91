"""Peak memory of `prepare` on ONE huge document: a single line of N MB made of this Python's standard
library source (newlines turned into spaces), prepared in this process with one worker (the case
where encoding happens here too), then the process's peak RSS.

    python bench/prepare_memory.py [--mb 100] [--tokenizer bpe]

Acceptance (issue 12): peak RSS at most 1 GiB for a 100 MB one-line document.
"""

from __future__ import annotations

import argparse
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare


def one_line_document(path: Path, mb: int) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < mb * 2**20:
            for source in sorted(root.glob("*.py")):
                text = source.read_text(encoding="utf-8", errors="replace").replace("\n", " ")
                f.write(text)
                n += len(text)
                if n >= mb * 2**20:
                    break


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--tokenizer", default="bpe", choices=["bpe", "char"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "one.txt"
        one_line_document(src, args.mb)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        prepare(DataConfig(sources=[str(src)], tokenizer=args.tokenizer, workers=1), Path(tmp) / "ds", progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.mb} MB one-line document, {args.tokenizer}: peak RSS {peak:,.0f} MiB "
          f"(before prepare {before:,.0f} MiB), {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
