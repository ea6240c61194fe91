"""Fuzzing at bench strength: 2,000 generated inputs per target of tests/test_fuzz.py (prepare inputs,
config overrides, generate arguments, evaluation records), with hypothesis's statistics.

    python bench/fuzz.py [--examples 2000]

Acceptance (issue 12): zero failing examples, i.e. never a traceback for an input error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per target (default 2000)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LMFORGE_FUZZ": "bench", "LMFORGE_FUZZ_EXAMPLES": str(args.examples)}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--hypothesis-show-statistics", str(root / "tests" / "test_fuzz.py")], env=env, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
