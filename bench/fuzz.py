"""Fuzzing at bench strength: 2,000 generated inputs per target of tests/test_fuzz.py (prepare inputs,
config overrides, generate arguments, evaluation records, the server's request bodies), with hypothesis's
statistics (for the server: how many bodies got each HTTP status).

    python bench/fuzz.py [--examples 2000] [--only server]

Acceptance (issue 12): zero failing examples, i.e. never a traceback for an input error. Issue 28: 2,000 request
bodies to a real uvicorn on 127.0.0.1, none answered 5xx, and a normal request answered after each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per target (default 2000)")
    ap.add_argument("--only", metavar="WORDS", help="only the targets whose test names match (pytest -k), e.g. server")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LMFORGE_FUZZ": "bench", "LMFORGE_FUZZ_EXAMPLES": str(args.examples)}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--hypothesis-show-statistics", *(["-k", args.only] if args.only else []),
                            str(root / "tests" / "test_fuzz.py")], env=env, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
